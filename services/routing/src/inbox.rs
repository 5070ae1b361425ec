//! Institution inboxes: routing's deliveries served through the platform's consumer streams
//! ([`onestop_platform::inbox`]: flow control, leases, acknowledgements, wake-ups).

use onestop_platform::inbox::{AckOutcome, Inboxes, Leased, Source};
use time::OffsetDateTime;

use crate::error::RoutingError;
use crate::model::Delivery;
use crate::service::Routing;

impl Leased for Delivery {
    fn id(&self) -> &str {
        &self.id
    }

    fn lease_until(&self) -> OffsetDateTime {
        self.lease_until
    }
}

impl Source for Routing {
    type Delivery = Delivery;
    type Error = RoutingError;

    fn inboxes(&self) -> &Inboxes {
        self.inboxes()
    }

    async fn claim(
        &self,
        inbox: &str,
        consumer: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, RoutingError> {
        Routing::claim(self, inbox, consumer, limit).await
    }

    async fn ack(
        &self,
        inbox: &str,
        consumer: &str,
        acks: &[Vec<String>],
        was_sent: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Vec<(String, AckOutcome)>>, RoutingError> {
        Routing::ack(self, inbox, consumer, acks, was_sent).await
    }

    async fn release_consumer(&self, inbox: &str, consumer: &str) -> Result<u64, RoutingError> {
        Ok(self.store().release_consumer(inbox, consumer).await?)
    }

    async fn next_lease_end(&self, inbox: &str) -> Result<Option<OffsetDateTime>, RoutingError> {
        Ok(self.store().next_lease_end(inbox).await?)
    }

    fn misplaced(&self, what: &'static str) -> RoutingError {
        RoutingError::invalid("kind", what)
    }

    fn shutting_down(&self) -> RoutingError {
        RoutingError::Unavailable("the routing service is shutting down; reconnect".into())
    }
}
