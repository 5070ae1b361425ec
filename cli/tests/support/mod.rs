//! What the tests that run the real `onestop` binary share: reading the gateway's address that
//! `onestop up` prints, and calling the gateway as a member.

// Each test binary uses what it needs of this.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use tokio::io::{BufReader, Lines};
use tokio::process::ChildStdout;
use tonic::transport::Channel;

/// Reads `onestop up`'s standard output until it prints the gateway's address (once everything
/// listens), within 60 s, and returns it; the lines after it are left to read.
pub async fn gateway_address(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("onestop's output") {
            if let Some(rest) = line.strip_prefix("gateway: ") {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        }
        panic!("onestop exited without printing the gateway's address");
    })
    .await
    .expect("onestop printed the gateway's address within 60 s")
}

/// A channel to `gateway` with the certificate `name` of the PKI directory `pki`.
pub fn member_channel(gateway: &str, pki: &Path, name: &str) -> Channel {
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(pki, name)).expect("certificate");
    let config = tls::client_config(&material, None).expect("client TLS");
    onestop_platform::client::channel(gateway, "localhost", config, Duration::from_secs(30))
        .expect("channel")
}
