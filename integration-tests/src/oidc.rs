//! Two real OpenID providers for the identity tests: the npm package `oidc-provider` run by
//! `integration-tests/oidc/providers.mjs` in one node process, the residents' provider and the
//! staff provider, each on its own ephemeral port of 127.0.0.1; plus [`browse`], which plays the
//! person at the provider's pages the way a browser does.
//!
//! A real provider rather than a hand-made imitation, so that what the identity service accepts
//! is what a certified OpenID provider actually sends (discovery, PKCE, `iss` in the
//! authorization response, key ids, signatures). The node package is installed by
//! `scripts/install-tools` into `integration-tests/oidc/node_modules`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::Url;

/// The identity service's client id at both providers.
pub const CLIENT_ID: &str = "onestop-identity";
/// The client secret at both providers unless `OIDC_CLIENT_SECRET` says otherwise.
pub const DEFAULT_CLIENT_SECRET: &str = "dev-secret-0123456789abcdef0123";

/// The residents' portal's redirect URI, registered at both providers.
pub const PORTAL_REDIRECT_URI: &str = "https://portal.test/callback";
/// The staff desk's redirect URI, registered at both providers.
pub const DESK_REDIRECT_URI: &str = "https://desk.test/callback";
/// A third registered redirect URI, for tests of a code sent back to the wrong front end.
pub const OTHER_REDIRECT_URI: &str = "https://other.test/callback";

/// The residents' provider, as [`Providers::tamper_next_id_token`] names it.
pub const RESIDENT_PROVIDER: &str = "resident";
/// The staff provider, as [`Providers::tamper_next_id_token`] names it. It authenticates the
/// client with `client_secret_post` only, as its discovery says.
pub const STAFF_PROVIDER: &str = "staff";
/// The HTTPS copy of the residents' provider, as [`Providers::tamper_next_id_token`] names it.
pub const TLS_PROVIDER: &str = "tls";

/// The residents' provider's scope carrying `personal_code`, `eidas_id`, `country`,
/// `given_name` and `family_name`.
pub const IDENTITY_SCOPE: &str = "identity";
/// The staff provider's scope carrying `staff_id`, `institution`, `centre` and `roles`.
pub const STAFF_SCOPE: &str = "staff";

/// The lowest level of assurance both providers offer.
pub const ACR_LOW: &str = "urn:onestop:loa:low";
/// The middle level of assurance.
pub const ACR_SUBSTANTIAL: &str = "urn:onestop:loa:substantial";
/// The highest level of assurance.
pub const ACR_HIGH: &str = "urn:onestop:loa:high";

/// A Latvian resident at the residents' provider: Jānis Bērziņš, country LV.
pub const LV_RESIDENT: &str = "lv-resident";
/// [`LV_RESIDENT`]'s personal code (old format, valid check digit).
pub const LV_RESIDENT_PERSONAL_CODE: &str = "121282-11236";
/// Another Latvian resident: Līga Kalniņa, country LV.
pub const LV_RESIDENT_2: &str = "lv-resident-2";
/// [`LV_RESIDENT_2`]'s personal code (old format, valid check digit).
pub const LV_RESIDENT_2_PERSONAL_CODE: &str = "050390-12344";
/// An Estonian visitor identified through eIDAS, without a personal code: Mari Tamm, country EE.
pub const EE_VISITOR: &str = "ee-visitor";
/// [`EE_VISITOR`]'s eIDAS identifier.
pub const EE_VISITOR_EIDAS_ID: &str = "EE/LV/38001085718";

/// A clerk of Gulbene municipality's centre, at the staff provider.
pub const CLERK_GULBENE: &str = "clerk-gulbene";
/// [`CLERK_GULBENE`]'s `staff_id`.
pub const CLERK_GULBENE_STAFF_ID: &str = "j.ozola";
/// [`CLERK_GULBENE`]'s `institution`.
pub const GULBENE_INSTITUTION: &str = "MUN/GULBENE";
/// [`CLERK_GULBENE`]'s `centre`.
pub const GULBENE_CENTRE: &str = "gulbene-kac";
/// A clerk of Rugāji municipality's centre, at the staff provider.
pub const CLERK_RUGAJI: &str = "clerk-rugaji";
/// [`CLERK_RUGAJI`]'s `staff_id`.
pub const CLERK_RUGAJI_STAFF_ID: &str = "a.liepa";
/// [`CLERK_RUGAJI`]'s `institution`.
pub const RUGAJI_INSTITUTION: &str = "MUN/RUGAJI";
/// [`CLERK_RUGAJI`]'s `centre`.
pub const RUGAJI_CENTRE: &str = "rugaji-kac";
/// A specialist of the state social insurance agency, at no centre (the `centre` claim is
/// absent).
pub const SPECIALIST_VSAA: &str = "specialist-vsaa";
/// [`SPECIALIST_VSAA`]'s `staff_id`.
pub const SPECIALIST_VSAA_STAFF_ID: &str = "p.kalnins";
/// [`SPECIALIST_VSAA`]'s `institution`.
pub const VSAA_INSTITUTION: &str = "GOV/VSAA";
/// The role of both clerks.
pub const ROLE_CLERK: &str = "clerk";
/// The role of the specialist.
pub const ROLE_SPECIALIST: &str = "specialist";

/// How long the providers may take to start, and any one request to them.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The two providers, running until dropped (the node process is killed and reaped in Drop).
pub struct Providers {
    /// The residents' provider's issuer, `http://127.0.0.1:<port>`.
    pub resident: String,
    /// The staff provider's issuer, `http://127.0.0.1:<port>`.
    pub staff: String,
    /// The HTTPS copy of the residents' provider, `https://127.0.0.1:<port>`, when started with
    /// [`Providers::start_with_tls`].
    pub tls: Option<String>,
    /// The URL of the control endpoint behind [`Providers::tamper_next_id_token`].
    pub tamper: String,
    /// The secret of [`CLIENT_ID`] at both providers.
    pub client_secret: String,
    http: reqwest::Client,
    // Killed and reaped when the providers are dropped.
    _node: Node,
}

/// The node process. Its stdin stays open while this lives: node exits when it closes, so the
/// providers die with the test process even when it is killed and no Drop runs.
struct Node {
    child: Child,
    // Kept open so that node never writes into a closed pipe, though it writes nothing more.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Killed, then waited for, so that no zombie outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The line providers.mjs prints once all its servers listen.
#[derive(serde::Deserialize)]
struct Announcement {
    resident: String,
    staff: String,
    tamper: String,
    #[serde(default)]
    tls: Option<String>,
}

impl Providers {
    /// Starts `node integration-tests/oidc/providers.mjs` (path from env!("CARGO_MANIFEST_DIR")),
    /// waits for its JSON line (no sleeps; a 30 s bound), fails with a clear message if node or
    /// node_modules are missing ("run scripts/install-tools").
    ///
    /// The client secret is `OIDC_CLIENT_SECRET` when set, else [`DEFAULT_CLIENT_SECRET`], and is
    /// handed to node explicitly so that both sides agree.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_node(None).await
    }

    /// As [`Providers::start`], with a third provider (a copy of the residents') serving HTTPS
    /// with the certificate and key of these PEM files.
    pub async fn start_with_tls(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        Self::start_node(Some((cert, key))).await
    }

    async fn start_node(tls: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let dir = providers_dir();
        if !dir
            .join("node_modules/oidc-provider/package.json")
            .is_file()
        {
            bail!(
                "oidc-provider is not installed in {}: run scripts/install-tools",
                dir.join("node_modules").display()
            );
        }
        let client_secret = std::env::var("OIDC_CLIENT_SECRET")
            .ok()
            .filter(|secret| !secret.is_empty())
            .unwrap_or_else(|| DEFAULT_CLIENT_SECRET.to_owned());
        let mut node = spawn_node(&dir, &client_secret, tls)?;
        let stdout = node.child.stdout.take().context("the providers' stdout")?;
        // A blocking read on its own thread; the timeout kills node, which ends the read.
        let reading = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line);
            (reader, read.map(|_| line))
        });
        let (reader, line) = match tokio::time::timeout(TIMEOUT, reading).await {
            Ok(joined) => joined.context("reading the providers' addresses")?,
            Err(_) => bail!(
                "providers.mjs did not report its addresses within {} s",
                TIMEOUT.as_secs()
            ),
        };
        node._stdout = Some(reader);
        let line = line.context("reading the providers' stdout")?;
        if line.is_empty() {
            let status = node.child.wait()?;
            bail!("providers.mjs exited ({status}) before listening; its stderr says why");
        }
        let announced: Announcement = serde_json::from_str(&line)
            .with_context(|| format!("providers.mjs printed {line:?}, not its addresses"))?;
        Ok(Self {
            resident: announced.resident,
            staff: announced.staff,
            tls: announced.tls,
            tamper: announced.tamper,
            client_secret,
            // The providers (Node.js) close idle connections after 5 s; reusing one then
            // could meet the close halfway.
            http: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .pool_idle_timeout(onestop_identity::providers::IDLE_CONNECTION_REUSE)
                .build()?,
            _node: node,
        })
    }

    /// One-shot claim overrides for the next ID token of `provider` ("resident"/"staff"):
    /// the next token response of that provider that carries an ID token carries one whose
    /// payload has `claims` (a JSON object) merged over the real claims, a `null` value
    /// removing the claim, re-signed with that provider's own key (same `kid`, same `alg`), so
    /// that only the claims are wrong. Later ID tokens are genuine again.
    pub async fn tamper_next_id_token(
        &self,
        provider: &str,
        claims: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.control(serde_json::json!({ "provider": provider, "claims": claims }))
            .await
    }

    /// Rotates the signing key of `provider`: a new RS256 key (a new `kid`) is published in its
    /// key set and signs every ID token from now on, as when a provider rotates its keys.
    pub async fn rotate_signing_key(&self, provider: &str) -> anyhow::Result<()> {
        self.control(serde_json::json!({ "provider": provider, "rotate": true }))
            .await
    }

    /// Makes the next token response of `provider` come `delay` late, and not at all if the
    /// client gave up by then (a slow provider).
    pub async fn delay_next_token_response(
        &self,
        provider: &str,
        delay: Duration,
    ) -> anyhow::Result<()> {
        let ms = u64::try_from(delay.as_millis())?;
        self.control(serde_json::json!({ "provider": provider, "delay_token_ms": ms }))
            .await
    }

    /// Overrides members of `provider`'s discovery document (`issuer`, `jwks_uri`, ...) until
    /// called again; `null` ends the overrides.
    pub async fn override_discovery(
        &self,
        provider: &str,
        members: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.control(serde_json::json!({ "provider": provider, "discovery": members }))
            .await
    }

    async fn control(&self, order: serde_json::Value) -> anyhow::Result<()> {
        let response = self
            .http
            .post(&self.tamper)
            .json(&order)
            .send()
            .await
            .context("the providers' control endpoint")?;
        let status = response.status();
        if status != reqwest::StatusCode::NO_CONTENT {
            let text = response.text().await.unwrap_or_default();
            bail!("the control endpoint refused the tampering ({status}): {text}");
        }
        Ok(())
    }
}

fn spawn_node(
    dir: &Path,
    client_secret: &str,
    tls: Option<(&Path, &Path)>,
) -> anyhow::Result<Node> {
    let mut command = Command::new(node());
    if let Some((cert, key)) = tls {
        command.env("OIDC_TLS_CERT", cert).env("OIDC_TLS_KEY", key);
    }
    let child = command
        .arg("providers.mjs")
        .current_dir(dir)
        .env("OIDC_CLIENT_SECRET", client_secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Its logs (and oidc-provider's warnings) show with the test's output.
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "node was not found: Node.js 20.12 or later is needed for the OpenID \
                     providers; run scripts/install-tools"
                )
            } else {
                anyhow!(error).context(format!("starting node in {}", dir.display()))
            }
        })?;
    Ok(Node {
        child,
        _stdout: None,
    })
}

pub use onestop_cli::devlogin::{Callback, Login, browse};

/// Where the node side lives: `integration-tests/oidc`.
/// The Node.js that `scripts/install-tools` checked to be recent enough (`.tools/bin/node`),
/// else whatever `node` is on `PATH`.
fn node() -> PathBuf {
    let checked = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/node");
    if checked.is_file() {
        checked
    } else {
        PathBuf::from("node")
    }
}

fn providers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// An ID token a provider issued directly, as an upstream provider's token looks.
#[derive(Clone, Debug)]
pub struct IdTokenFlow {
    /// The ID token, compact JWS.
    pub id_token: String,
    /// The nonce the flow asked for.
    pub nonce: String,
}

fn random_base64url(bytes: usize) -> anyhow::Result<String> {
    use base64::Engine;
    let mut buffer = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buffer)
        .map_err(|_| anyhow!("no randomness"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer))
}

impl Providers {
    /// The whole code flow at the provider `issuer` as the identity service does it (PKCE,
    /// state, nonce), asking for `scope` besides `openid`, played by the test itself: the ID
    /// token the provider issues, to try where only platform tokens belong.
    pub async fn id_token(
        &self,
        issuer: &str,
        scope: &str,
        login: &Login<'_>,
    ) -> anyhow::Result<IdTokenFlow> {
        use base64::Engine;
        let http = reqwest::Client::new();
        let discovery: serde_json::Value = http
            .get(format!("{issuer}/.well-known/openid-configuration"))
            .send()
            .await?
            .json()
            .await?;
        let endpoint = |name: &str| {
            discovery[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("discovery has no {name}"))
        };
        let verifier = random_base64url(32)?;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()),
        );
        let (state, nonce) = (random_base64url(16)?, random_base64url(16)?);
        let scope = format!("openid {scope}");
        let url = Url::parse_with_params(
            &endpoint("authorization_endpoint")?,
            [
                ("response_type", "code"),
                ("client_id", CLIENT_ID),
                ("redirect_uri", PORTAL_REDIRECT_URI),
                ("scope", &scope),
                ("state", &state),
                ("nonce", &nonce),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
                // Asked for, and not enforced by the provider: the person chooses.
                ("acr_values", ACR_SUBSTANTIAL),
            ],
        )?;
        let callback = browse(url.as_str(), login).await?;
        if !callback.url.starts_with(PORTAL_REDIRECT_URI)
            || callback.state.as_deref() != Some(state.as_str())
            || callback.iss.as_deref() != Some(issuer)
        {
            bail!("unexpected callback {callback:?}");
        }
        let code = callback.code.ok_or_else(|| anyhow!("no code"))?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", PORTAL_REDIRECT_URI),
            ("code_verifier", &verifier),
        ];
        // The client authenticates the way the provider's discovery says it accepts.
        let post = discovery["token_endpoint_auth_methods_supported"]
            .as_array()
            .is_some_and(|methods| !methods.iter().any(|m| m == "client_secret_basic"));
        let request = http.post(endpoint("token_endpoint")?);
        let request = if post {
            form.extend([
                ("client_id", CLIENT_ID),
                ("client_secret", &self.client_secret),
            ]);
            request
        } else {
            request.basic_auth(CLIENT_ID, Some(&self.client_secret))
        };
        let tokens: serde_json::Value = request
            .form(&form)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id_token = tokens["id_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no ID token"))?
            .to_owned();
        Ok(IdTokenFlow { id_token, nonce })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::Value;

    use super::*;

    /// The check digit rule of old-format personal codes, DDMMYY-CNNNN.
    fn personal_code_valid(code: &str) -> bool {
        let digits: Vec<u32> = code.chars().filter_map(|c| c.to_digit(10)).collect();
        if digits.len() != 11 || code.len() != 12 || code.as_bytes()[6] != b'-' {
            return false;
        }
        let weights = [1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        let sum: u32 = weights.iter().zip(&digits).map(|(w, d)| w * d).sum();
        let check = (1101 - sum) % 11;
        check < 10 && check == digits[10]
    }

    #[test]
    fn the_personal_codes_have_valid_check_digits() {
        assert!(personal_code_valid(LV_RESIDENT_PERSONAL_CODE));
        assert!(personal_code_valid(LV_RESIDENT_2_PERSONAL_CODE));
        // The rule is really checked: the brief's example has none that fits.
        assert!(!personal_code_valid("121282-11210"));
    }

    fn decode_part(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url"))
            .expect("a JSON part")
    }

    /// Checks the RS256 signature of `id_token` against the provider's published keys.
    fn verify_rs256(id_token: &str, jwks: &Value) {
        let (input, signature) = id_token.rsplit_once('.').expect("a compact JWS");
        let header = decode_part(input.split('.').next().expect("a header"));
        assert_eq!(header["alg"], "RS256");
        let key = jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|key| key["kid"] == header["kid"])
            .expect("the signing key is published");
        let component = |name: &str| {
            URL_SAFE_NO_PAD
                .decode(key[name].as_str().expect("an RSA member"))
                .expect("base64url")
        };
        ring::signature::RsaPublicKeyComponents {
            n: component("n"),
            e: component("e"),
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            &URL_SAFE_NO_PAD.decode(signature).expect("base64url"),
        )
        .expect("a valid signature by the provider's own key");
    }

    /// The whole code flow (see [`Providers::id_token`]), with the token's signature checked;
    /// the ID token's header and payload.
    async fn sign_in(
        providers: &Providers,
        issuer: &str,
        scope: &str,
        login: &Login<'_>,
    ) -> (Value, Value) {
        let flow = providers
            .id_token(issuer, scope, login)
            .await
            .expect("the code flow");
        let jwks: Value = reqwest::Client::new()
            .get(format!("{issuer}/jwks"))
            .send()
            .await
            .expect("JWKS")
            .json()
            .await
            .expect("JWKS JSON");
        verify_rs256(&flow.id_token, &jwks);
        let mut parts = flow.id_token.split('.');
        let header = decode_part(parts.next().expect("a header"));
        let mut payload = decode_part(parts.next().expect("a payload"));
        assert_eq!(payload["nonce"], flow.nonce.as_str());
        // Checked here so that the tests below compare only what they are about.
        payload["nonce"] = Value::Null;
        (header, payload)
    }

    #[tokio::test]
    async fn oidc_providers_sign_in_and_tamper() {
        let providers = Providers::start().await.expect("the OpenID providers");
        let login = Login {
            account: LV_RESIDENT,
            acr: ACR_HIGH,
        };

        let (header, payload) =
            sign_in(&providers, &providers.resident, IDENTITY_SCOPE, &login).await;
        assert_eq!(payload["iss"], providers.resident.as_str());
        assert_eq!(payload["aud"], CLIENT_ID);
        assert_eq!(payload["sub"], LV_RESIDENT);
        assert_eq!(payload["personal_code"], LV_RESIDENT_PERSONAL_CODE);
        assert_eq!(payload["given_name"], "Jānis");
        assert_eq!(payload["country"], "LV");
        assert_eq!(payload["acr"], ACR_HIGH);

        providers
            .tamper_next_id_token(
                RESIDENT_PROVIDER,
                serde_json::json!({ "aud": "someone-else" }),
            )
            .await
            .expect("tampering");
        let (tampered_header, tampered) =
            sign_in(&providers, &providers.resident, IDENTITY_SCOPE, &login).await;
        assert_eq!(tampered["aud"], "someone-else");
        assert_eq!(tampered["personal_code"], LV_RESIDENT_PERSONAL_CODE);
        assert_eq!(tampered_header, header, "same kid, same alg");

        // One-shot: the next ID token is genuine again.
        let (_, again) = sign_in(&providers, &providers.resident, IDENTITY_SCOPE, &login).await;
        assert_eq!(again["aud"], CLIENT_ID);

        // The staff provider: its own scope and claims, an array of roles, an absent centre.
        let specialist = Login {
            account: SPECIALIST_VSAA,
            acr: ACR_SUBSTANTIAL,
        };
        let (_, staff) = sign_in(&providers, &providers.staff, STAFF_SCOPE, &specialist).await;
        assert_eq!(staff["iss"], providers.staff.as_str());
        assert_eq!(staff["sub"], SPECIALIST_VSAA);
        assert_eq!(staff["staff_id"], SPECIALIST_VSAA_STAFF_ID);
        assert_eq!(staff["institution"], VSAA_INSTITUTION);
        assert_eq!(staff["roles"], serde_json::json!([ROLE_SPECIALIST]));
        assert_eq!(staff["acr"], ACR_SUBSTANTIAL);
        assert!(staff.get("centre").is_none(), "{staff}");
        assert!(staff.get("personal_code").is_none(), "{staff}");

        // An unknown account is refused on the login page, which browse reports.
        let url = format!(
            "{}/auth?response_type=code&client_id={CLIENT_ID}&redirect_uri={PORTAL_REDIRECT_URI}\
             &scope=openid&code_challenge={}&code_challenge_method=S256",
            providers.resident, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        );
        let refused = browse(
            &url,
            &Login {
                account: "nobody",
                acr: ACR_LOW,
            },
        )
        .await
        .expect_err("an unknown account is refused");
        assert!(
            refused.to_string().contains("Unknown account: nobody"),
            "{refused:#}"
        );
    }
}
