//! An institution's (or a company's) incoming messages as a consumer stream: the platform's
//! inbox streams ([`onestop_platform::inbox`]: flow control, leases, acknowledgements,
//! wake-ups) over the deliveries to its mailbox. Acknowledging a message records it as
//! retrieved.

use onestop_platform::inbox::{AckOutcome, Inboxes, Leased, Source};
use time::OffsetDateTime;

use crate::error::EaddressError;
use crate::model::{Delivery, Message};
use crate::service::Eaddress;

/// A message leased to a stream.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    /// The message.
    pub message: Message,
    /// Its delivery to the mailbox.
    pub delivery: Delivery,
    /// How many times it was leased, this one included.
    pub attempt: u32,
    /// When the lease ends.
    pub lease_until: OffsetDateTime,
}

impl Leased for IncomingMessage {
    fn id(&self) -> &str {
        &self.message.id
    }

    fn lease_until(&self) -> OffsetDateTime {
        self.lease_until
    }
}

impl Source for Eaddress {
    const COMPONENT: &'static str = "eaddress";

    type Delivery = IncomingMessage;
    type Error = EaddressError;

    fn inboxes(&self) -> &Inboxes {
        self.inboxes()
    }

    async fn claim(
        &self,
        inbox: &str,
        consumer: &str,
        limit: u32,
    ) -> Result<Vec<IncomingMessage>, EaddressError> {
        let now = onestop_platform::clock::now();
        let lease_until = now + self.incoming_lease();
        let claimed = self
            .store()
            .claim_incoming(inbox, consumer, limit, now, lease_until)
            .await?;
        let mut messages = Vec::with_capacity(claimed.len());
        for (id, attempt) in claimed {
            let (Some(message), Some(delivery)) = (
                self.store().message(&id).await?,
                self.store().delivery(&id, inbox).await?,
            ) else {
                return Err(EaddressError::Internal(format!(
                    "claimed message {id} is missing"
                )));
            };
            messages.push(IncomingMessage {
                message,
                delivery,
                attempt,
                lease_until,
            });
        }
        Ok(messages)
    }

    async fn ack(
        &self,
        inbox: &str,
        consumer: &str,
        acks: &[Vec<String>],
        was_sent: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Vec<(String, AckOutcome)>>, EaddressError> {
        onestop_platform::inbox::check_acks(acks)
            .map_err(|e| EaddressError::invalid("ack.names", e))?;
        let ids: Vec<String> = acks.iter().flatten().cloned().collect();
        let found = self
            .store()
            .ack_incoming(inbox, consumer, &ids, onestop_platform::clock::now())
            .await?;
        self.wake.evidence.notify_one();
        Ok(onestop_platform::inbox::outcomes(acks, found, was_sent))
    }

    async fn release_consumer(&self, inbox: &str, consumer: &str) -> Result<u64, EaddressError> {
        Ok(self.store().release_incoming(inbox, consumer).await?)
    }

    async fn next_lease_end(&self, inbox: &str) -> Result<Option<OffsetDateTime>, EaddressError> {
        Ok(self.store().next_incoming_lease_end(inbox).await?)
    }

    fn misplaced(&self, what: &'static str) -> EaddressError {
        EaddressError::invalid("kind", what)
    }

    fn shutting_down(&self) -> EaddressError {
        EaddressError::Unavailable("the e-address service is shutting down; reconnect".into())
    }
}
