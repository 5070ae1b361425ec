//! Inboxes as consumer streams, the same for every service that delivers to a member's system
//! (routing's applications, the e-address's incoming messages): flow control (never more
//! unacknowledged deliveries on a stream than the consumer allows), leases, acknowledgements,
//! and wake-ups when a commit adds to an inbox — in process, and across replicas through
//! PostgreSQL's LISTEN/NOTIFY — rather than polling.
//!
//! A service provides the deliveries through [`Source`]; this module runs the stream. A stream
//! holds in memory only the ids it has out (at most its window) and the one delivery it is
//! handing to the transport; a consumer that stops reading blocks its own stream's sending and
//! nothing else, and its leases expire so that others get the work.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Most deliveries claimed at once for one stream.
const BATCH: u32 = 16;
/// How many delivery ids a stream remembers having sent (to tell a late ack from a
/// stranger's); older ones are forgotten first.
const REMEMBERED: usize = 4_096;
/// How long a stream waits at most before looking at its inbox again, should a wake-up be
/// lost (a replica's notification while its listener reconnected).
const IDLE_RECHECK: Duration = Duration::from_secs(30);
/// Most acknowledgements taken into one transaction.
const MAX_ACKS_AT_ONCE: usize = 64;
/// The largest window a consumer may ask for.
pub const MAX_WINDOW: u32 = 1_000;

/// What happened to one acknowledged id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Acknowledged (now or before).
    Acknowledged,
    /// Never sent to this consumer, or unknown in the inbox.
    NotSent,
    /// Its lease expired and another consumer holds it now.
    LeasedElsewhere,
}

impl AckOutcome {
    /// The reason the contract gives for a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            AckOutcome::Acknowledged => "ACKNOWLEDGED",
            AckOutcome::NotSent => "DELIVERY_NOT_SENT",
            AckOutcome::LeasedElsewhere => "DELIVERY_LEASED_ELSEWHERE",
        }
    }
}

/// What a store found when it acknowledged one id for a consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckFound {
    /// Acknowledged now, or before by this consumer.
    Acknowledged,
    /// Another consumer holds it, or had it last.
    OtherConsumer,
    /// Not in this inbox, or never delivered.
    Unknown,
}

/// Most ids in one acknowledgement.
pub const MAX_ACK_IDS: usize = 1_000;

/// Checks that each acknowledgement names 1-[`MAX_ACK_IDS`] ids.
pub fn check_acks(acks: &[Vec<String>]) -> Result<(), String> {
    if acks
        .iter()
        .any(|ids| ids.is_empty() || ids.len() > MAX_ACK_IDS)
    {
        Err(format!("must name 1-{MAX_ACK_IDS} deliveries"))
    } else {
        Ok(())
    }
}

/// The answers to several acknowledgements from what the store found for their ids in order
/// (`found` is as long as all of them together): an id another consumer holds is
/// `LeasedElsewhere` only if this consumer was sent it, otherwise it is no business of this one.
pub fn outcomes(
    acks: &[Vec<String>],
    found: Vec<AckFound>,
    was_sent: &(dyn Fn(&str) -> bool + Sync),
) -> Vec<Vec<(String, AckOutcome)>> {
    let mut found = found.into_iter();
    acks.iter()
        .map(|ids| {
            ids.iter()
                .zip(found.by_ref())
                .map(|(id, found)| {
                    let outcome = match found {
                        AckFound::Acknowledged => AckOutcome::Acknowledged,
                        AckFound::OtherConsumer if was_sent(id) => AckOutcome::LeasedElsewhere,
                        AckFound::OtherConsumer | AckFound::Unknown => AckOutcome::NotSent,
                    };
                    (id.clone(), outcome)
                })
                .collect()
        })
        .collect()
}

/// A delivery leased to a consumer.
pub trait Leased: Send + 'static {
    /// Its id in the inbox, which the consumer acknowledges.
    fn id(&self) -> &str;
    /// When its lease ends (it is delivered again after that, unless acknowledged).
    fn lease_until(&self) -> OffsetDateTime;
    /// The W3C trace context of the call that caused it, which its delivery's span links to.
    fn cause(&self) -> Option<&str> {
        None
    }
}

/// Where an inbox's deliveries come from: a service's store and rules.
pub trait Source: Send + Sync + 'static {
    /// The platform component whose inboxes these are, for the deliveries' spans.
    const COMPONENT: &'static str;
    /// A delivery.
    type Delivery: Leased;
    /// The service's error.
    type Error: std::fmt::Display + Send + 'static;

    /// The wake-ups of this service's inboxes.
    fn inboxes(&self) -> &Inboxes;

    /// Leases up to `limit` deliveries of `inbox` to `consumer`: those ready, and those whose
    /// lease ended.
    fn claim(
        &self,
        inbox: &str,
        consumer: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Self::Delivery>, Self::Error>> + Send;

    /// Acknowledges several acknowledgements' ids for `consumer` at once, answering each
    /// apart; `was_sent` says whether this consumer was sent an id (to tell a late ack from a
    /// stranger's).
    fn ack(
        &self,
        inbox: &str,
        consumer: &str,
        acks: &[Vec<String>],
        was_sent: &(dyn Fn(&str) -> bool + Sync),
    ) -> impl Future<Output = Result<Vec<Vec<(String, AckOutcome)>>, Self::Error>> + Send;

    /// Makes what `consumer` still holds available to others at once; how many.
    fn release_consumer(
        &self,
        inbox: &str,
        consumer: &str,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// When the next lease in `inbox` ends, if any is out.
    fn next_lease_end(
        &self,
        inbox: &str,
    ) -> impl Future<Output = Result<Option<OffsetDateTime>, Self::Error>> + Send;

    /// The error for a stream message out of place (a second `open`, an empty message).
    fn misplaced(&self, what: &'static str) -> Self::Error;

    /// The error that ends streams at shutdown.
    fn shutting_down(&self) -> Self::Error;
}

/// Wake-ups of the streams waiting on each inbox.
#[derive(Debug, Default)]
pub struct Inboxes {
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Inboxes {
    /// The wake-up of `inbox`.
    fn waker(&self, inbox: &str) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // Forget inboxes nobody waits on any more, so that the map stays as small as the
        // number of inboxes with consumers.
        if waiting.len() > 64 {
            waiting.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        waiting.entry(inbox.to_owned()).or_default().clone()
    }

    /// Wakes the streams waiting on `inbox` (after a commit added to it).
    pub fn wake(&self, inbox: &str) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = waiting.get(inbox) {
            notify.notify_waiters();
        }
    }

    /// Follows commits made by other replicas on PostgreSQL (LISTEN on `channel`, whose
    /// payloads name inboxes) until `shutdown`; nothing to do on SQLite, where one process owns
    /// the database.
    pub fn follow_postgres(
        self: &Arc<Self>,
        url: String,
        channel: &'static str,
        shutdown: CancellationToken,
    ) {
        let inboxes = self.clone();
        tokio::spawn(async move {
            loop {
                let listened = async {
                    let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
                    listener.listen(channel).await?;
                    loop {
                        let notification = listener.recv().await?;
                        inboxes.wake(notification.payload());
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), sqlx::Error>(())
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    result = listened => {
                        if let Err(error) = result {
                            tracing::warn!(%error, "listening for inbox commits failed; again in 1 s");
                        }
                    }
                }
                // Commits missed meanwhile are found by the streams' own recheck.
                inboxes.wake_all();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }

    fn wake_all(&self) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for notify in waiting.values() {
            notify.notify_waiters();
        }
    }
}

/// What a consumer says after opening.
#[derive(Debug)]
pub enum Incoming {
    /// Deliveries processed.
    Ack(Vec<String>),
    /// Something a stream may not carry here (a second `open`, an empty message).
    Misplaced(&'static str),
}

/// What the platform says on a stream.
#[derive(Debug)]
pub enum Outgoing<D> {
    /// A delivery.
    Delivery(Box<D>),
    /// The answer to one acknowledgement.
    AckResult(Vec<(String, AckOutcome)>),
}

/// The ids a stream has sent: those still out, with their lease ends, and a bounded memory of
/// every id sent.
struct Sent {
    out: HashMap<String, OffsetDateTime>,
    remembered: HashSet<String>,
    order: VecDeque<String>,
}

impl Sent {
    fn new() -> Self {
        Self {
            out: HashMap::new(),
            remembered: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    fn add(&mut self, id: &str, lease_until: OffsetDateTime) {
        self.out.insert(id.to_owned(), lease_until);
        if self.remembered.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > REMEMBERED
                && let Some(old) = self.order.pop_front()
            {
                self.remembered.remove(&old);
            }
        }
    }

    /// Forgets what is out past its lease: it counts against the window no more.
    fn expire(&mut self, now: OffsetDateTime) {
        self.out.retain(|_, until| *until > now);
    }

    fn next_expiry(&self) -> Option<OffsetDateTime> {
        self.out.values().min().copied()
    }
}

/// Runs one consumer's stream on `inbox` (already checked to be the caller's) until the
/// consumer goes away, `incoming` fails, or `shutdown`; then makes what it still had out
/// available to the inbox's other consumers at once.
pub async fn run<S: Source>(
    source: Arc<S>,
    inbox: String,
    window: u32,
    mut incoming: impl Stream<Item = Result<Incoming, S::Error>> + Unpin + Send,
    outgoing: mpsc::Sender<Result<Outgoing<S::Delivery>, S::Error>>,
    shutdown: CancellationToken,
) {
    let consumer = format!("stream:{}", uuid::Uuid::now_v7());
    let ended = serve_stream(
        &*source,
        &inbox,
        &consumer,
        window,
        &mut incoming,
        &outgoing,
        &shutdown,
    )
    .await;
    if let Err(error) = ended {
        let _ = outgoing.send(Err(error)).await;
    }
    match source.release_consumer(&inbox, &consumer).await {
        Ok(0) => {}
        Ok(released) => {
            tracing::info!(%inbox, released, "a consumer left; its deliveries are available again");
            source.inboxes().wake(&inbox);
        }
        // The leases end on their own.
        Err(error) => tracing::warn!(%error, %inbox, "releasing a consumer's deliveries failed"),
    }
}

async fn serve_stream<S: Source>(
    source: &S,
    inbox: &str,
    consumer: &str,
    window: u32,
    incoming: &mut (impl Stream<Item = Result<Incoming, S::Error>> + Unpin + Send),
    outgoing: &mpsc::Sender<Result<Outgoing<S::Delivery>, S::Error>>,
    shutdown: &CancellationToken,
) -> Result<(), S::Error> {
    let waker = source.inboxes().waker(inbox);
    let mut sent = Sent::new();
    loop {
        // Registered before looking, so that a commit landing while we look still wakes us.
        let woken = waker.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        let now = crate::clock::now();
        sent.expire(now);
        let free = window.saturating_sub(sent.out.len() as u32);
        let mut full_batch = false;
        if free > 0 {
            let limit = free.min(BATCH);
            let batch = source.claim(inbox, consumer, limit).await?;
            full_batch = batch.len() as u32 == limit;
            for delivery in batch {
                sent.add(delivery.id(), delivery.lease_until());
                // A span of the consumer's stream, linked to the call that caused the delivery.
                let span = tracing::info_span!(
                    "inbox.deliver",
                    onestop.component = S::COMPONENT,
                    inbox,
                    delivery_id = delivery.id(),
                );
                crate::telemetry::linked_to(&span, delivery.cause());
                // Waits while the consumer is not reading: the stream's memory is this one
                // message and the transport's flow-control window.
                tokio::select! {
                    () = shutdown.cancelled() => return Err(source.shutting_down()),
                    sending = outgoing.send(Ok(Outgoing::Delivery(Box::new(delivery)))).instrument(span) => {
                        if sending.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
        if full_batch {
            continue;
        }
        // Wake for: new work, an ack, our own leases ending (window frees), others' leases
        // ending (redelivery), shutdown.
        let mut wake_at = now + IDLE_RECHECK;
        if let Some(expiry) = sent.next_expiry() {
            wake_at = wake_at.min(expiry);
        }
        if free > 0
            && let Some(end) = source.next_lease_end(inbox).await?
        {
            wake_at = wake_at.min(end.max(now + Duration::from_millis(10)));
        }
        let sleep = (wake_at - now).try_into().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = shutdown.cancelled() => return Err(source.shutting_down()),
            () = &mut woken => {}
            () = tokio::time::sleep(sleep) => {}
            message = incoming.next() => match message {
                None => return Ok(()),
                Some(Err(error)) => return Err(error),
                Some(Ok(Incoming::Misplaced(what))) => return Err(source.misplaced(what)),
                Some(Ok(Incoming::Ack(ids))) => {
                    // Acknowledgements already waiting share one transaction.
                    let mut acks = vec![ids];
                    let mut then = None;
                    while acks.len() < MAX_ACKS_AT_ONCE {
                        match incoming.next().now_or_never() {
                            Some(Some(Ok(Incoming::Ack(more)))) => acks.push(more),
                            Some(other) => {
                                then = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let remembered = &sent.remembered;
                    let answers = source
                        .ack(inbox, consumer, &acks, &|id| remembered.contains(id))
                        .await?;
                    for outcomes in answers {
                        for (id, outcome) in &outcomes {
                            if *outcome == AckOutcome::Acknowledged {
                                sent.out.remove(id);
                            }
                        }
                        if outgoing.send(Ok(Outgoing::AckResult(outcomes))).await.is_err() {
                            return Ok(());
                        }
                    }
                    match then {
                        None | Some(Some(Ok(Incoming::Ack(_)))) => {}
                        Some(None) => return Ok(()),
                        Some(Some(Err(error))) => return Err(error),
                        Some(Some(Ok(Incoming::Misplaced(what)))) => {
                            return Err(source.misplaced(what));
                        }
                    }
                }
            },
        }
    }
}
