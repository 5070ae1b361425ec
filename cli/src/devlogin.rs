//! Logging a person in at the development OpenID providers (`scripts/dev-oidc`) from the
//! terminal: `onestop login` starts a login at the identity service as a front end, fills in the
//! provider's own pages as a browser would (the development providers ask only for an account
//! and a level), completes the login and prints the platform token. For development and the
//! tests only: a real eID provider needs a real browser and a real person.

use std::time::Duration;

use anyhow::{Context, bail};
use onestop_proto::identity::v1 as identity;
use reqwest::Url;
use reqwest::redirect::Policy;

use crate::client::{Connection, failed, note};
use crate::session::{self, Session};

/// How long one page may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How many pages a login may take.
const MAX_STEPS: usize = 20;

/// What a person does at the provider's pages.
#[derive(Clone, Copy, Debug)]
pub struct Login<'a> {
    /// The account to log in as, e.g. [`LV_RESIDENT`]; an unknown one makes [`browse`] fail
    /// with the login page's error.
    pub account: &'a str,
    /// The level of assurance chosen on the login page, e.g. [`ACR_HIGH`]; the ID token
    /// carries it as `acr` whatever the client asked for.
    pub acr: &'a str,
}

/// Where the provider sent the browser back: the redirect URI's query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Callback {
    /// The whole URL the browser was sent to.
    pub url: String,
    /// `code`, on success.
    pub code: Option<String>,
    /// `state`, as the client sent it.
    pub state: Option<String>,
    /// `error`, when the provider refused the request (e.g. `invalid_scope`).
    pub error: Option<String>,
    /// `error_description`, with `error`.
    pub error_description: Option<String>,
    /// `iss` (RFC 9207), which oidc-provider always adds.
    pub iss: Option<String>,
}

impl Callback {
    fn from_url(url: &Url) -> Self {
        let value = |name: &str| {
            url.query_pairs()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
        };
        Self {
            url: url.to_string(),
            code: value("code"),
            state: value("state"),
            error: value("error"),
            error_description: value("error_description"),
            iss: value("iss"),
        }
    }
}

/// Acts as a browser: starts at `authorization_url`, follows redirects on the provider's origin
/// with a cookie jar (redirects NOT followed automatically by reqwest; follow them by hand),
/// fills in the login form with the account and acr, confirms consent, and stops at the first
/// redirect leaving the provider's origin (the front end's redirect URI), returning its query.
/// An error page or an unexpected status is an Err with the page's text.
///
/// Each call is a new browser (a new cookie jar), so the person always logs in and consents.
pub async fn browse(authorization_url: &str, login: &Login<'_>) -> anyhow::Result<Callback> {
    let start = Url::parse(authorization_url)
        .with_context(|| format!("authorization URL {authorization_url}"))?;
    let origin = start.origin();
    // By hand, because the last redirect goes to a front end that does not exist: it is the
    // answer, not somewhere to go.
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .timeout(TIMEOUT)
        .build()?;
    let mut response = browser.get(start).send().await?;
    let (mut logged_in, mut consented) = (false, false);
    for _ in 0..MAX_STEPS {
        let url = response.url().clone();
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .with_context(|| format!("a {status} without a Location from {url}"))?
                .to_str()
                .with_context(|| format!("the Location of the {status} from {url}"))?;
            let next = url
                .join(location)
                .with_context(|| format!("Location {location:?} from {url}"))?;
            if next.origin() != origin {
                return Ok(Callback::from_url(&next));
            }
            response = browser.get(next).send().await?;
            continue;
        }
        let page = response.text().await?;
        if status != reqwest::StatusCode::OK {
            bail!("{status} from {url}: {}", page_text(&page));
        }
        let action = form_action(&page)
            .with_context(|| format!("no form at {url}: {}", page_text(&page)))?;
        let target = url.join(&action)?;
        if target.origin() != origin {
            bail!("the form at {url} posts to another origin ({target}): not a page of ours");
        }
        if target.path().ends_with("/login") {
            // The login page again after a login: the provider refused it.
            if logged_in {
                bail!("the login was refused at {url}: {}", page_text(&page));
            }
            logged_in = true;
            let form = [("login", login.account), ("acr", login.acr)];
            response = browser.post(target).form(&form).send().await?;
        } else if target.path().ends_with("/confirm") {
            if consented {
                bail!("consent asked again at {url}: {}", page_text(&page));
            }
            consented = true;
            response = browser
                .post(target)
                .form(&[] as &[(&str, &str)])
                .send()
                .await?;
        } else {
            bail!(
                "an unexpected form at {url} (to {target}): {}",
                page_text(&page)
            );
        }
    }
    bail!("the provider's pages took more than {MAX_STEPS} steps")
}

/// The `action` of the first form of a page (our own pages: one form each, attribute in double
/// quotes).
fn form_action(page: &str) -> Option<String> {
    let form = &page[page.find("<form")?..];
    let form = &form[..form.find('>')?];
    let value = &form[form.find("action=\"")? + "action=\"".len()..];
    Some(unescape(&value[..value.find('"')?]))
}

/// A page's text without its markup, for error messages.
fn page_text(page: &str) -> String {
    // The head's title repeats the heading; the body is what a person reads.
    let body = page.find("<body").map_or(page, |start| &page[start..]);
    let mut text = String::with_capacity(body.len());
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    unescape(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// `onestop login`.
#[derive(clap::Args)]
pub struct LoginArgs {
    /// How to reach the gateway, as which front end (`--as demo-centre`: the desk application).
    #[command(flatten)]
    connection: Connection,
    /// The identity service's provider id.
    #[arg(long, default_value = "dev-residents")]
    provider: String,
    /// The account at the development provider: `lv-resident`, `lv-resident-2`, `ee-visitor`,
    /// or staff such as `clerk-gulbene`.
    #[arg(long, default_value = "lv-resident")]
    account: String,
    /// The level of assurance chosen at the provider: `low`, `substantial` or `high`.
    #[arg(long, default_value = "high")]
    level: String,
    /// The front end's redirect URI registered with identity.
    #[arg(long, default_value = "https://desk.test/callback")]
    redirect_uri: String,
}

/// Logs in and prints the access token on standard output (who logged in, and where the
/// session is kept, on standard error). The session goes to `--sessions`, so that commands
/// given the printed token renew it for as long as the session lasts.
pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    // Logging in carries no person's token, whatever ONESTOP_TOKEN holds.
    let mut client =
        identity::identity_service_client::IdentityServiceClient::new(args.connection.channel()?);
    let started = client
        .start_login(identity::StartLoginRequest {
            provider_id: args.provider,
            redirect_uri: args.redirect_uri,
            minimum_level: identity::LevelOfAssurance::Unspecified as i32,
        })
        .await
        .map_err(failed)?
        .into_inner();
    let acr = format!("urn:onestop:loa:{}", args.level);
    let callback = browse(
        &started.authorization_url,
        &Login {
            account: &args.account,
            acr: &acr,
        },
    )
    .await
    .context("at the provider's pages (is scripts/dev-oidc running?)")?;
    let (Some(code), Some(state)) = (callback.code, callback.state) else {
        bail!(
            "the provider refused the login: {} {}",
            callback.error.unwrap_or_default(),
            callback.error_description.unwrap_or_default()
        );
    };
    let done = client
        .complete_login(identity::CompleteLoginRequest {
            state,
            code,
            ..Default::default()
        })
        .await
        .map_err(failed)?
        .into_inner();
    if let Some(person) = &done.person {
        note(&format!("logged in: {}", who(person)));
    }
    let tokens = done.tokens.context("no tokens in the answer")?;
    let session = Session::from_tokens(&tokens)?;
    let kept = session::keep(
        args.connection.sessions_dir(),
        &tokens.access_token,
        &session,
    )?;
    note(&format!(
        "session kept in {} until {}: commands given this token renew it as it expires",
        kept.display(),
        session
            .session_expire_time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    ));
    crate::client::emit(&tokens.access_token)
}

/// `onestop logout`.
#[derive(clap::Args)]
pub struct LogoutArgs {
    /// How to reach the gateway, as the front end that logged the person in, and the token
    /// `onestop login` printed (`--token` or `ONESTOP_TOKEN`).
    #[command(flatten)]
    connection: Connection,
}

/// Ends the session `onestop login` kept for the given token, at identity and on disk.
pub async fn logout(args: LogoutArgs) -> anyhow::Result<()> {
    let Some(token) = args.connection.token() else {
        bail!("name the token `onestop login` printed: --token or ONESTOP_TOKEN");
    };
    let path = session::file_of(args.connection.sessions_dir(), token);
    if !path.exists() {
        bail!(
            "no session is kept for this token in {}",
            args.connection.sessions_dir().display()
        );
    }
    let kept = session::read_kept(&path)?;
    let mut client =
        identity::identity_service_client::IdentityServiceClient::new(args.connection.channel()?);
    // Fields the contract may gain keep their defaults.
    #[allow(clippy::needless_update)]
    let request = identity::LogoutRequest {
        refresh_token: kept.refresh_token,
        ..Default::default()
    };
    client.logout(request).await.map_err(failed)?;
    session::forget(&path)?;
    note("logged out: the session has ended");
    Ok(())
}

/// Who logged in, in words: a resident by name and personal code, staff (whom the staff
/// provider names by id only) by id, institution, centre and roles; and the level.
fn who(person: &identity::Person) -> String {
    let level = identity::LevelOfAssurance::try_from(person.level)
        .map(|l| {
            l.as_str_name()
                .trim_start_matches("LEVEL_OF_ASSURANCE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let name = format!("{} {}", person.given_name, person.family_name);
    let name = name.trim();
    let described = match &person.subject {
        Some(identity::person::Subject::Resident(id)) => {
            format!("{name} ({})", id.value)
        }
        Some(identity::person::Subject::Staff(staff)) => {
            let mut text = if name.is_empty() {
                format!("staff {}", staff.staff_id)
            } else {
                format!("{name} (staff {})", staff.staff_id)
            };
            if let Some(institution) = &staff.institution {
                text.push_str(&format!(
                    " of {}",
                    crate::client::format_member(institution)
                ));
            }
            if !staff.centre.is_empty() {
                text.push_str(&format!(" at centre {}", staff.centre));
            }
            if !staff.roles.is_empty() {
                text.push_str(&format!(", roles {}", staff.roles.join(", ")));
            }
            text
        }
        None => name.to_owned(),
    };
    format!("{described} at level {level}")
}

#[cfg(test)]
mod tests {
    use onestop_proto::r#type::v1::{MemberId, PersonId};

    use super::*;

    #[test]
    fn a_resident_is_named_and_staff_without_names_by_their_directory_entry() {
        let resident = identity::Person {
            subject: Some(identity::person::Subject::Resident(PersonId {
                scheme: 1,
                value: "121282-11236".into(),
            })),
            given_name: "Jānis".into(),
            family_name: "Bērziņš".into(),
            level: identity::LevelOfAssurance::High as i32,
            ..Default::default()
        };
        assert_eq!(who(&resident), "Jānis Bērziņš (121282-11236) at level high");
        let clerk = identity::Person {
            subject: Some(identity::person::Subject::Staff(identity::StaffMember {
                staff_id: "j.ozola".into(),
                institution: Some(MemberId {
                    member_class: "MUN".into(),
                    member_code: "GULBENE".into(),
                    subsystem: String::new(),
                }),
                centre: "gulbene-kac".into(),
                roles: vec!["clerk".into()],
            })),
            level: identity::LevelOfAssurance::Substantial as i32,
            ..Default::default()
        };
        assert_eq!(
            who(&clerk),
            "staff j.ozola of MUN/GULBENE at centre gulbene-kac, roles clerk at level substantial"
        );
    }
}
