//! `onestop pki`: a development or test CA and the certificates it issues.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use onestop_platform::identity::{Member, SpiffeId};
use onestop_platform::pki::{Ca, IssueRequest, summarize};

/// Makes a new CA in `dir` (refusing to overwrite one).
pub fn init(dir: &Path, trust_domain: &str) -> anyhow::Result<String> {
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        );
    }
    let ca = Ca::generate(trust_domain)?;
    ca.save(dir)?;
    // An empty revocation list from the start, so that servers can be pointed at it before
    // anything is revoked.
    ca.write_crl(dir, &[])?;
    Ok(format!(
        "made a CA for trust domain {trust_domain} in {} (revocation list: {})",
        dir.display(),
        onestop_platform::pki::CRL_FILE
    ))
}

/// What `pki issue` names in the certificate.
pub enum Subject {
    /// A member system, `CLASS/CODE/SUBSYSTEM`.
    Member(String),
    /// A platform component such as `gateway`.
    Platform(String),
}

/// Issues `<name>.pem` and `<name>.key` in `dir`.
pub fn issue(
    dir: &Path,
    name: &str,
    subject: Subject,
    trust_domain: &str,
    days: u64,
    serve_localhost: bool,
) -> anyhow::Result<String> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        || name.is_empty()
        || name == "ca"
    {
        bail!("`{name}` is not a usable file name: letters, digits, - and _ only, not `ca`");
    }
    if dir.join(format!("{name}.pem")).exists() {
        bail!("{name}.pem exists already in {}", dir.display());
    }
    if !(1..=3650).contains(&days) {
        bail!("--days must be between 1 and 3650");
    }
    let ca = Ca::load(dir).context("loading the CA (run `onestop pki init` first)")?;
    let identity = match subject {
        Subject::Member(member) => SpiffeId::member(trust_domain, Member::parse(&member)?),
        Subject::Platform(component) => {
            SpiffeId::parse(&format!("spiffe://{trust_domain}/platform/{component}"))?
        }
    };
    let mut request = IssueRequest::new(
        name,
        Some(identity.clone()),
        Duration::from_secs(days * 86_400),
    );
    if serve_localhost {
        request = request.serving_localhost();
    }
    ca.issue(&request)?.save(dir, name)?;
    Ok(format!(
        "issued {name}.pem for {identity}, valid {days} days"
    ))
}

/// Adds certificate `<name>.pem` of `dir` to the CA's revocation list.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = dir.join(format!("{name}.pem"));
    let pem =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if name == "ca" {
        bail!("the CA cannot revoke itself; make a new CA instead");
    }
    let ca = Ca::load(dir).context("loading the CA")?;
    let listed = ca.revoke(dir, &pem)?;
    Ok(format!(
        "revoked {name}.pem; {} lists {listed} certificate(s); servers pick it up within their reload interval",
        dir.join(onestop_platform::pki::CRL_FILE).display()
    ))
}

/// Describes every certificate in `dir`, marking those its CA's revocation list names.
pub fn show(dir: &Path) -> anyhow::Result<String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "pem"))
        .collect();
    entries.sort();
    let revoked = onestop_platform::pki::revoked_in(dir)
        .with_context(|| format!("reading the revocation list of {}", dir.display()))?;
    let mut out = String::new();
    for path in entries {
        let pem = std::fs::read_to_string(&path)?;
        let summary = summarize(&pem).with_context(|| path.display().to_string())?;
        let names = &summary.names;
        let serial = onestop_platform::pki::serial_of(&pem)?;
        let revocation = revoked
            .iter()
            .find(|(listed, _)| *listed == serial)
            .map(|(_, when)| {
                let when = when
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                format!("\n  REVOKED:  {when}")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{}\n  subject:  {}\n  identity: {}\n  names:    {}\n  valid:    {} .. {}{}{revocation}\n",
            path.file_name().unwrap_or_default().to_string_lossy(),
            summary.subject,
            if summary.uris.is_empty() {
                "(none)".to_owned()
            } else {
                summary.uris.join(", ")
            },
            if names.is_empty() {
                "(none)".to_owned()
            } else {
                names.join(", ")
            },
            summary.not_before,
            summary.not_after,
            if summary.is_ca {
                "\n  CA:       yes"
            } else {
                ""
            },
        ));
    }
    Ok(out)
}
