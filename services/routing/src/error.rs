//! The routing service's errors: the platform's [`Failure`] in routing's own error domain,
//! which is also where they become gRPC statuses.

use onestop_platform::failure::{Domain, Failure};

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "routing.onestop.lv";

/// Routing's error domain.
#[derive(Debug)]
pub struct RoutingDomain;

impl Domain for RoutingDomain {
    const NAME: &'static str = DOMAIN;
}

/// What can go wrong in the routing service.
pub type RoutingError = Failure<RoutingDomain>;
