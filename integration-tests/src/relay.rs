//! A TCP relay that stands in for a whole host: it forwards connections to a target given
//! after it is bound, and can be killed, which ends every connection through it and closes
//! its port at once, as a crashed machine would look to its peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A relay on a free loopback port.
pub struct Relay {
    /// Where it listens.
    pub address: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
    killed: CancellationToken,
    relayed: Arc<AtomicUsize>,
}

impl Relay {
    /// Binds a free port; connections made before [`Relay::point_to`] are closed at once.
    pub async fn bind() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (target, targets) = watch::channel(None);
        let killed = CancellationToken::new();
        let relayed = Arc::new(AtomicUsize::new(0));
        {
            let killed = killed.clone();
            let relayed = relayed.clone();
            tokio::spawn(async move {
                loop {
                    let (mut inbound, _) = tokio::select! {
                        () = killed.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(_) => continue,
                        },
                    };
                    let Some(target) = *targets.borrow() else {
                        continue;
                    };
                    let killed = killed.clone();
                    let relayed = relayed.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        relayed.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            () = killed.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            });
        }
        Ok(Self {
            address,
            target,
            killed,
            relayed,
        })
    }

    /// Forwards new connections to `target`.
    pub fn point_to(&self, target: SocketAddr) {
        self.target.send_replace(Some(target));
    }

    /// How many connections it has relayed.
    pub fn relayed(&self) -> usize {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Ends every connection and closes the port.
    pub fn kill(&self) {
        self.killed.cancel();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.killed.cancel();
    }
}
