//! Institution inboxes: routing's deliveries served through the platform's consumer streams
//! ([`onestop_platform::inbox`]: flow control, leases, acknowledgements, wake-ups), and the
//! figures an operator watches them by.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use onestop_platform::inbox::{AckOutcome, Inboxes, Leased, Source};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;

use crate::catalogue::Catalogue;
use crate::store::InboxFigure;

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

    fn cause(&self) -> Option<&str> {
        self.application.trace_context.as_deref()
    }
}

impl Source for Routing {
    const COMPONENT: &'static str = "routing";

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

/// The label of an inbox's figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct DestinationLabels {
    /// A destination of the catalogue (`CLASS/CODE/subsystem`), or [`UNLISTED`].
    pub destination: String,
}

/// Where deliveries to an inbox the catalogue no longer lists are counted: their number stays
/// bounded by the catalogue, and what they still hold is not hidden.
pub const UNLISTED: &str = "unlisted";

/// The inboxes' figures, per destination. The gauges are counted from the database every
/// [`crate::FIGURES_REFRESH`] (every replica on one database reports the same figures:
/// aggregate them with `max`, not `sum`); the counters are this replica's own.
#[derive(Debug)]
pub struct InboxFigures {
    /// Deliveries ready or leased, not yet acknowledged.
    pub unacknowledged: Family<DestinationLabels, Gauge>,
    /// Deliveries parked after too many attempts.
    pub parked: Family<DestinationLabels, Gauge>,
    /// How long ago the oldest unacknowledged delivery's application was accepted, seconds.
    pub oldest_age: Family<DestinationLabels, Gauge<f64, AtomicU64>>,
    /// Deliveries sent to a consumer (a redelivery counts again).
    pub sent: Family<DestinationLabels, Counter>,
    /// Deliveries acknowledged.
    pub acknowledged: Family<DestinationLabels, Counter>,
}

/// The process's inbox figures, registered once.
pub fn figures() -> &'static InboxFigures {
    static FIGURES: OnceLock<InboxFigures> = OnceLock::new();
    FIGURES.get_or_init(|| {
        let figures = InboxFigures {
            unacknowledged: Family::default(),
            parked: Family::default(),
            oldest_age: Family::default(),
            sent: Family::default(),
            acknowledged: Family::default(),
        };
        onestop_platform::metrics::register(
            "routing_inbox_unacknowledged_deliveries",
            "Deliveries of the destination's inbox ready or leased, not yet acknowledged",
            figures.unacknowledged.clone(),
        );
        onestop_platform::metrics::register(
            "routing_inbox_parked_deliveries",
            "Deliveries of the destination's inbox parked after too many attempts",
            figures.parked.clone(),
        );
        onestop_platform::metrics::register(
            "routing_inbox_oldest_unacknowledged_age_seconds",
            "Age of the oldest unacknowledged delivery of the destination's inbox (0 when none)",
            figures.oldest_age.clone(),
        );
        onestop_platform::metrics::register(
            "routing_deliveries_sent",
            "Deliveries sent to the destination's consumers, redeliveries included",
            figures.sent.clone(),
        );
        onestop_platform::metrics::register(
            "routing_deliveries_acknowledged",
            "Deliveries the destination's consumers acknowledged",
            figures.acknowledged.clone(),
        );
        figures
    })
}

/// The label of `inbox`: itself when the catalogue lists it, [`UNLISTED`] otherwise.
pub fn destination_label(catalogue: &Catalogue, inbox: &str) -> DestinationLabels {
    DestinationLabels {
        destination: if catalogue.destinations.contains_key(inbox) {
            inbox.to_owned()
        } else {
            UNLISTED.to_owned()
        },
    }
}

/// What one destination's gauges show.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shown {
    /// Ready or leased.
    pub unacknowledged: u64,
    /// Parked.
    pub parked: u64,
    /// Seconds since the oldest unacknowledged one was accepted.
    pub oldest_age_s: f64,
}

/// The gauges of every destination of the catalogue (zero where nothing waits) and of
/// [`UNLISTED`], from the database's counts at `now`.
pub fn shown(
    catalogue: &Catalogue,
    counted: &[InboxFigure],
    now: OffsetDateTime,
) -> BTreeMap<DestinationLabels, Shown> {
    let mut shown: BTreeMap<DestinationLabels, Shown> = catalogue
        .destinations
        .keys()
        .chain(std::iter::once(&UNLISTED.to_owned()))
        .map(|destination| {
            (
                DestinationLabels {
                    destination: destination.clone(),
                },
                Shown::default(),
            )
        })
        .collect();
    for figure in counted {
        let entry = shown
            .entry(destination_label(catalogue, &figure.inbox))
            .or_default();
        if figure.state == "parked" {
            entry.parked += figure.deliveries;
            continue;
        }
        entry.unacknowledged += figure.deliveries;
        let accepted = uuid::Uuid::parse_str(&figure.oldest)
            .ok()
            .and_then(|id| id.get_timestamp())
            .map(|stamp| stamp.to_unix());
        if let Some((seconds, nanos)) = accepted {
            let age = (now.unix_timestamp_nanos() as f64 / 1e9)
                - (seconds as f64 + f64::from(nanos) / 1e9);
            entry.oldest_age_s = entry.oldest_age_s.max(age.max(0.0));
        }
    }
    shown
}

impl InboxFigures {
    /// Shows what the database counted.
    pub fn show(&self, shown: &BTreeMap<DestinationLabels, Shown>) {
        for (labels, figures) in shown {
            self.unacknowledged
                .get_or_create(labels)
                .set(i64::try_from(figures.unacknowledged).unwrap_or(i64::MAX));
            self.parked
                .get_or_create(labels)
                .set(i64::try_from(figures.parked).unwrap_or(i64::MAX));
            self.oldest_age
                .get_or_create(labels)
                .set(figures.oldest_age_s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{CatalogueFile, Destination};

    #[test]
    fn figures_are_shown_per_destination_of_the_catalogue_and_the_rest_as_unlisted() {
        let mut catalogue = Catalogue::of(CatalogueFile::default()).unwrap();
        for member in ["GOV/VSAA/pensions", "GOV/VID/taxes"] {
            catalogue
                .put_destination(Destination {
                    member: member.into(),
                    title_lv: "Iestāde".into(),
                    title_en: "Institution".into(),
                })
                .unwrap();
        }
        let accepted = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let id = |at: OffsetDateTime| {
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                u64::try_from(at.unix_timestamp()).unwrap(),
                0,
            );
            uuid::Uuid::new_v7(ts).to_string()
        };
        let figure = |inbox: &str, state: &str, deliveries, oldest: String| InboxFigure {
            inbox: inbox.into(),
            state: state.into(),
            deliveries,
            oldest,
        };
        let counted = [
            figure("GOV/VSAA/pensions", "ready", 3, id(accepted)),
            figure(
                "GOV/VSAA/pensions",
                "leased",
                2,
                id(accepted + time::Duration::hours(1)),
            ),
            figure("GOV/VSAA/pensions", "parked", 1, id(accepted)),
            figure("GOV/OLD/gone", "ready", 4, id(accepted)),
        ];
        let shown = shown(&catalogue, &counted, accepted + time::Duration::hours(2));
        let of = |destination: &str| {
            shown[&DestinationLabels {
                destination: destination.into(),
            }]
        };
        assert_eq!(of("GOV/VSAA/pensions").unacknowledged, 5);
        assert_eq!(of("GOV/VSAA/pensions").parked, 1);
        assert!((of("GOV/VSAA/pensions").oldest_age_s - 7200.0).abs() < 1.0);
        assert_eq!(
            of("GOV/VID/taxes"),
            Shown::default(),
            "listed, nothing waits"
        );
        assert_eq!(of(UNLISTED).unacknowledged, 4);
        assert_eq!(shown.len(), 3);
    }
}
