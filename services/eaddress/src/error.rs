//! The e-address's errors: the platform's [`Failure`] in the e-address's own error domain,
//! which is also where they become gRPC statuses.

use onestop_platform::failure::{Domain, Failure};

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "eaddress.onestop.lv";

/// The e-address's error domain.
#[derive(Debug)]
pub struct EaddressDomain;

impl Domain for EaddressDomain {
    const NAME: &'static str = DOMAIN;
}

/// What can go wrong in the e-address service.
pub type EaddressError = Failure<EaddressDomain>;
