//! Platform tokens: how fast one core verifies them, and a realistic token for the gateway
//! measurement, signed with the identity service's own key.

use std::path::Path;
use std::time::{Duration, Instant};

use onestop_platform::person::Level;
use onestop_platform::tokens::{self, Authentication, Claims, SigningKey, Verifier};

use crate::say;

/// The claims of a resident's token issued to `client`, valid for an hour.
fn resident(client: &str) -> Claims {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Claims {
        iss: tokens::issuer("onestop.lv"),
        aud: tokens::audience("onestop.lv"),
        sub: "lv:121282-11236".into(),
        exp: now + 3600,
        iat: now,
        nbf: now,
        jti: "bench-0123456789abcdef".into(),
        cid: client.into(),
        sid: Some("bench-session-0123456789".into()),
        auth: Authentication {
            provider: "latvija".into(),
            level: Level::High,
            country: Some("LV".into()),
            time: now,
        },
        given_name: Some("Jānis".into()),
        family_name: Some("Bērziņš".into()),
        staff: None,
        act: None,
        mandate: None,
    }
}

/// A resident's token for `client`, signed with the key the identity service keeps in
/// `key_dir` (waiting, within 30 s, for the service to make it).
pub fn person_token(key_dir: &Path, client: &str) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let key = std::fs::read_dir(key_dir).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".p8")
                    .map(|kid| (kid.to_owned(), e.path()))
            })
        });
        if let Some((kid, path)) = key {
            let key = SigningKey::from_pkcs8(&kid, &std::fs::read(path)?)
                .map_err(|e| anyhow::anyhow!(e))?;
            return key.sign(&resident(client)).map_err(|e| anyhow::anyhow!(e));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no key in {} within 30 s",
            key_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Verifications a second on one core (this thread), and the time of one.
pub fn verification(seconds: u64) -> anyhow::Result<()> {
    let client = "spiffe://onestop.lv/member/MUN/GULBENE/kac";
    let (key, _) = SigningKey::generate("k1-bench").map_err(|e| anyhow::anyhow!(e))?;
    let verifier = Verifier::new("onestop.lv");
    verifier
        .set_keys(&tokens::key_set([&key]))
        .map_err(|e| anyhow::anyhow!(e))?;
    let token = key
        .sign(&resident(client))
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut count = 0u64;
    let started = Instant::now();
    let duration = Duration::from_secs(seconds);
    while started.elapsed() < duration {
        for _ in 0..100 {
            verifier.verify(&token, client)?;
        }
        count += 100;
    }
    let elapsed = started.elapsed().as_secs_f64();
    say(&format!(
        "\nToken verification (ES256, {} B token), one thread, {seconds} s: {:.0} tokens/s, {:.1} µs each",
        token.len(),
        count as f64 / elapsed,
        elapsed / count as f64 * 1e6
    ));
    Ok(())
}
