//! The identity service against real OpenID providers (npm `oidc-provider`, driven through its
//! pages as a browser would), through the gateway, on SQLite and PostgreSQL: residents, foreign
//! eIDAS users and clerks log in and call as themselves; failed logins start no session; forged
//! and misused tokens stop at the gateway; keys rotate without breaking tokens; refresh tokens
//! rotate and a reuse ends the session; a method may require a level; and a clerk acts for a
//! resident under a mandate until it is revoked.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use onestop_integration_tests::echo::pb::WhoamiRequest;
use onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient;
use onestop_integration_tests::oidc::{self, Login, Providers};
use onestop_integration_tests::{Backend, TestFederation};
use onestop_platform::config::DatabaseConfig;
use onestop_platform::tokens::{Claims, SigningKey};
use onestop_proto::identity::v1::identity_service_client::IdentityServiceClient;
use onestop_proto::identity::v1::*;
use onestop_proto::r#type::v1::{PersonId, PersonIdScheme};
use sqlx::Row;
use tonic::Code;
use tonic::transport::Channel;

use crate::{on_both_backends, reason};

on_both_backends!(
    people_log_in_and_call_as_themselves,
    failed_logins_start_no_session,
    a_login_is_completed_only_by_its_front_end_and_survives_a_timeout,
    logout_reaches_the_gateway_within_seconds,
    refresh_tokens_rotate_and_a_reuse_ends_the_session,
    a_clerk_acts_for_a_resident_under_a_mandate_until_it_is_revoked,
);

/// The demo centre's desk application: a front end with `DESK_REDIRECT_URI`.
pub(crate) const CENTRE: &str = "demo-centre";
/// The demo institution's system: a front end with `PORTAL_REDIRECT_URI`.
pub(crate) const INSTITUTION: &str = "demo-institution";
const CENTRE_SPIFFE: &str = "spiffe://onestop.lv/member/MUN/GULBENE/kac";

pub(crate) struct World {
    pub(crate) fed: TestFederation,
    pub(crate) providers: Providers,
}

fn identity_toml(providers: &Providers) -> String {
    let acr = format!(
        "[providers.acr]\n\"{}\" = \"low\"\n\"{}\" = \"substantial\"\n\"{}\" = \"high\"\n",
        oidc::ACR_LOW,
        oidc::ACR_SUBSTANTIAL,
        oidc::ACR_HIGH
    );
    format!(
        "key_dir = \"identity-keys\"\nkey_rescan_s = 1\nkey_publish_lead_s = 1\n\n\
         [[providers]]\nid = \"residents\"\nissuer = \"{}\"\nclient_id = \"{}\"\n\
         client_secret_file = \"oidc-secret\"\nscopes = [\"{}\"]\naudience = \"residents\"\n{acr}\n\
         [[providers]]\nid = \"staff\"\nissuer = \"{}\"\nclient_id = \"{}\"\n\
         client_secret_file = \"oidc-secret\"\nscopes = [\"{}\"]\naudience = \"staff\"\n\
         institutions = [\"MUN/GULBENE\", \"MUN/RUGAJI\", \"GOV/VSAA\"]\n{acr}\n\
         [[front_ends]]\nmember = \"MUN/GULBENE/kac\"\nredirect_uris = [\"{}\"]\n\n\
         [[front_ends]]\nmember = \"GOV/VSAA/pensions\"\nredirect_uris = [\"{}\"]\n",
        providers.resident,
        oidc::CLIENT_ID,
        oidc::IDENTITY_SCOPE,
        providers.staff,
        oidc::CLIENT_ID,
        oidc::STAFF_SCOPE,
        oidc::DESK_REDIRECT_URI,
        oidc::PORTAL_REDIRECT_URI,
    )
}

pub(crate) async fn world(backend: Backend) -> World {
    world_with(backend, |_| {}).await
}

pub(crate) async fn world_with(
    backend: Backend,
    adjust: impl FnOnce(&mut onestop_cli::federation::Options) + Send + 'static,
) -> World {
    let providers = Providers::start().await.expect("the OpenID providers");
    world_of(backend, providers, String::new(), adjust).await
}

/// A federation whose identity service has the two providers and `more` settings (further
/// `[[providers]]`), with the started `providers`.
async fn world_of(
    backend: Backend,
    providers: Providers,
    more: String,
    adjust: impl FnOnce(&mut onestop_cli::federation::Options) + Send + 'static,
) -> World {
    let settings = format!(
        "{}
{more}",
        identity_toml(&providers)
    );
    let secret = providers.client_secret.clone();
    let fed = TestFederation::start_with(backend, move |options| {
        std::fs::write(options.data_dir.join("oidc-secret"), secret).unwrap();
        std::fs::write(options.data_dir.join("identity.toml"), settings).unwrap();
        adjust(options);
    })
    .await;
    World { fed, providers }
}

pub(crate) fn identity(fed: &TestFederation, system: &str) -> IdentityServiceClient<Channel> {
    IdentityServiceClient::new(fed.gateway_client(system))
}

pub(crate) fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A login's start at the front end `system`.
async fn start(
    fed: &TestFederation,
    system: &str,
    provider: &str,
    redirect: &str,
    minimum: LevelOfAssurance,
) -> Result<StartLoginResponse, tonic::Status> {
    identity(fed, system)
        .start_login(StartLoginRequest {
            provider_id: provider.into(),
            redirect_uri: redirect.into(),
            minimum_level: minimum as i32,
        })
        .await
        .map(|r| r.into_inner())
}

/// A whole login: start, the person at the provider's pages, completion.
pub(crate) async fn login(
    fed: &TestFederation,
    system: &str,
    provider: &str,
    account: &str,
    acr: &str,
    minimum: LevelOfAssurance,
) -> Result<CompleteLoginResponse, tonic::Status> {
    let redirect = if system == CENTRE {
        oidc::DESK_REDIRECT_URI
    } else {
        oidc::PORTAL_REDIRECT_URI
    };
    let started = start(fed, system, provider, redirect, minimum).await?;
    let back = oidc::browse(&started.authorization_url, &Login { account, acr })
        .await
        .expect("the browser flow");
    assert_eq!(back.state.as_deref(), Some(started.state.as_str()));
    identity(fed, system)
        .complete_login(CompleteLoginRequest {
            state: started.state,
            code: back.code.expect("a code"),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn whoami(
    fed: &TestFederation,
    system: &str,
    token: &str,
) -> Result<onestop_integration_tests::echo::pb::WhoamiResponse, tonic::Status> {
    EchoServiceClient::new(fed.gateway_client(system))
        .whoami(bearer(WhoamiRequest {}, token))
        .await
        .map(|r| r.into_inner())
}

async fn sessions(fed: &TestFederation) -> i64 {
    let db = onestop_platform::db::open(
        &DatabaseConfig::at(&fed.databases["identity"]),
        &onestop_identity::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let row = sqlx::query("SELECT COUNT(*) AS n FROM sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    row.try_get("n").unwrap()
}

pub(crate) fn tokens(response: &CompleteLoginResponse) -> &Tokens {
    response.tokens.as_ref().expect("tokens")
}

async fn people_log_in_and_call_as_themselves(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.identity.v1.IdentityService",
    )
    .await;
    let listed = identity(&fed, CENTRE)
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.providers.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["residents", "staff"]);

    // A resident with national eID at level high.
    let resident = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        LevelOfAssurance::Substantial,
    )
    .await
    .unwrap();
    let person = resident.person.as_ref().unwrap();
    assert_eq!(person.level, LevelOfAssurance::High as i32);
    assert_eq!(
        person.subject,
        Some(person::Subject::Resident(PersonId {
            scheme: PersonIdScheme::LvPersonalCode as i32,
            value: oidc::LV_RESIDENT_PERSONAL_CODE.into(),
        }))
    );
    let seen = whoami(&fed, CENTRE, &tokens(&resident).access_token)
        .await
        .unwrap();
    assert_eq!(
        seen.subject,
        format!("lv:{}", oidc::LV_RESIDENT_PERSONAL_CODE)
    );
    assert_eq!(
        (seen.level.as_str(), seen.caller.as_str()),
        ("high", CENTRE_SPIFFE)
    );

    // A foreign eIDAS user, through the other front end.
    let visitor = login(
        &fed,
        INSTITUTION,
        "residents",
        oidc::EE_VISITOR,
        oidc::ACR_SUBSTANTIAL,
        LevelOfAssurance::Unspecified,
    )
    .await
    .unwrap();
    let seen = whoami(&fed, INSTITUTION, &tokens(&visitor).access_token)
        .await
        .unwrap();
    assert_eq!(seen.subject, format!("eidas:{}", oidc::EE_VISITOR_EIDAS_ID));
    assert_eq!(seen.level, "substantial");

    // A clerk through the municipality's staff provider.
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        LevelOfAssurance::Unspecified,
    )
    .await
    .unwrap();
    let seen = whoami(&fed, CENTRE, &tokens(&clerk).access_token)
        .await
        .unwrap();
    assert_eq!(
        seen.subject,
        format!(
            "staff:{}/{}",
            oidc::GULBENE_INSTITUTION,
            oidc::CLERK_GULBENE_STAFF_ID
        )
    );
    assert_eq!(seen.staff_centre, oidc::GULBENE_CENTRE);
    assert_eq!(sessions(&fed).await, 3);
    fed.stop().await;
}

async fn failed_logins_start_no_session(backend: Backend) {
    let World { fed, providers } = world(backend).await;
    let refused = |status: &tonic::Status, code: Code, why: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(reason(status), why, "{status:?}");
    };
    let resident = Login {
        account: oidc::LV_RESIDENT,
        acr: oidc::ACR_HIGH,
    };
    let any = LevelOfAssurance::Unspecified;
    let mut desk = identity(&fed, CENTRE);

    // A state nobody issued.
    let started = start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap();
    let back = oidc::browse(&started.authorization_url, &resident)
        .await
        .unwrap();
    let status = desk
        .complete_login(CompleteLoginRequest {
            state: "forged-state".into(),
            code: back.code.clone().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&status, Code::Unauthenticated, "UNKNOWN_LOGIN");
    // The real state once, then the same code (and state) again.
    let complete = CompleteLoginRequest {
        state: started.state.clone(),
        code: back.code.unwrap(),
        ..Default::default()
    };
    desk.complete_login(complete.clone()).await.unwrap();
    let status = desk.complete_login(complete).await.unwrap_err();
    refused(&status, Code::Unauthenticated, "UNKNOWN_LOGIN");
    let one = sessions(&fed).await;
    assert_eq!(one, 1);

    // Another system cannot complete a login this one started.
    let started = start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap();
    let back = oidc::browse(&started.authorization_url, &resident)
        .await
        .unwrap();
    let status = identity(&fed, INSTITUTION)
        .complete_login(CompleteLoginRequest {
            state: started.state,
            code: back.code.unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&status, Code::Unauthenticated, "UNKNOWN_LOGIN");

    // The nonce changed on the way to the provider: the ID token carries the wrong one.
    let started = start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&started.authorization_url).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "nonce" {
                "swapped".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let back = oidc::browse(url.as_str(), &resident).await.unwrap();
    let status = desk
        .complete_login(CompleteLoginRequest {
            state: started.state,
            code: back.code.unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&status, Code::Unauthenticated, "LOGIN_REFUSED");

    // ID tokens with the wrong audience, issuer or expiry, signed with the provider's key.
    let past = time::OffsetDateTime::now_utc().unix_timestamp() - 3600;
    for claims in [
        serde_json::json!({"aud": "someone-else"}),
        serde_json::json!({"iss": "http://127.0.0.1:1/impostor"}),
        serde_json::json!({"exp": past, "iat": past - 600}),
    ] {
        providers
            .tamper_next_id_token(oidc::RESIDENT_PROVIDER, claims.clone())
            .await
            .unwrap();
        let status = login(
            &fed,
            CENTRE,
            "residents",
            oidc::LV_RESIDENT,
            oidc::ACR_HIGH,
            any,
        )
        .await
        .unwrap_err();
        refused(&status, Code::Unauthenticated, "LOGIN_REFUSED");
    }

    // A staff provider speaking for an institution it is not trusted for.
    providers
        .tamper_next_id_token(
            oidc::STAFF_PROVIDER,
            serde_json::json!({"institution": "MUN/RIGA"}),
        )
        .await
        .unwrap();
    let status = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap_err();
    refused(&status, Code::Unauthenticated, "LOGIN_REFUSED");

    // A level below the one asked for, with the level to ask for again.
    let status = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_SUBSTANTIAL,
        LevelOfAssurance::High,
    )
    .await
    .unwrap_err();
    refused(&status, Code::Unauthenticated, "LEVEL_OF_ASSURANCE_TOO_LOW");
    assert_eq!(required_level(&status), "high");

    // An unknown provider; a redirect URI registered for another front end.
    let status = start(&fed, CENTRE, "nowhere", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap_err();
    refused(&status, Code::NotFound, "UNKNOWN_PROVIDER");
    let status = start(&fed, CENTRE, "residents", oidc::PORTAL_REDIRECT_URI, any)
        .await
        .unwrap_err();
    refused(
        &status,
        Code::InvalidArgument,
        "REDIRECT_URI_NOT_REGISTERED",
    );

    assert_eq!(
        sessions(&fed).await,
        one,
        "no failed login started a session"
    );
    fed.stop().await;
}

fn required_level(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("required_level").cloned())
        .unwrap_or_default()
}

/// The claims of a token, read without checking (the test's own tokens).
fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// The identity service's own key of that id, read from its key directory.
fn identity_key(fed: &TestFederation, kid: &str) -> SigningKey {
    let der = std::fs::read(fed.data_dir.join("identity-keys").join(format!("{kid}.p8"))).unwrap();
    SigningKey::from_pkcs8(kid, &der).unwrap()
}

/// A compact JWS with the given header and payload and a signature made by `sign`.
fn jws(header: serde_json::Value, claims: &Claims, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    );
    let signature = URL_SAFE_NO_PAD.encode(sign(input.as_bytes()));
    format!("{input}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misused_tokens_are_refused_at_the_gateway() {
    let World { fed, providers } = world(Backend::Sqlite).await;
    let any = LevelOfAssurance::Unspecified;
    let good = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let token = tokens(&good).access_token.clone();
    whoami(&fed, CENTRE, &token)
        .await
        .expect("the genuine token");
    let kid = kid_of(&token);
    let key = identity_key(&fed, &kid);
    let claims = claims_of(&token);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    let mut tampered_payload = claims.clone();
    tampered_payload.sub = format!("lv:{}", oidc::LV_RESIDENT_2_PERSONAL_CODE);
    let swapped = {
        let mut parts: Vec<&str> = token.split('.').collect();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered_payload).unwrap());
        parts[1] = &payload;
        parts.join(".")
    };
    let (other_key, _) = SigningKey::generate(&kid).unwrap();
    let none = jws(
        serde_json::json!({"alg": "none", "typ": "at+jwt", "kid": kid}),
        &claims,
        |_| Vec::new(),
    );
    let public = key.jwk().to_string();
    let hs256 = jws(
        serde_json::json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}),
        &claims,
        |input| {
            let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, public.as_bytes());
            ring::hmac::sign(&mac, input).as_ref().to_vec()
        },
    );
    let embedded = {
        let mut with_jwk = serde_json::json!({"alg": "ES256", "typ": "at+jwt", "kid": kid});
        with_jwk["jwk"] = other_key.jwk();
        let pkcs8 = SigningKey::generate("x").unwrap().1;
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        jws(with_jwk, &claims, |input| {
            pair.sign(&ring::rand::SystemRandom::new(), input)
                .unwrap()
                .as_ref()
                .to_vec()
        })
    };
    let unknown_kid = SigningKey::generate("k1-unknown")
        .unwrap()
        .0
        .sign(&claims)
        .unwrap();
    let expired = key
        .sign(&Claims {
            exp: now - 3600,
            iat: now - 3900,
            nbf: now - 3900,
            ..claims.clone()
        })
        .unwrap();
    let wrong_audience = key
        .sign(&Claims {
            aud: "https://elsewhere.example".into(),
            ..claims.clone()
        })
        .unwrap();
    let upstream = providers
        .id_token(
            &providers.resident,
            oidc::IDENTITY_SCOPE,
            &Login {
                account: oidc::LV_RESIDENT,
                acr: oidc::ACR_HIGH,
            },
        )
        .await
        .unwrap()
        .id_token;
    let cases = [
        ("tampered payload", swapped, "TOKEN_INVALID"),
        (
            "another key, same kid",
            other_key.sign(&claims).unwrap(),
            "TOKEN_INVALID",
        ),
        // `none` is not an algorithm the verifier can even read: refused as malformed.
        ("alg none", none, "TOKEN_MALFORMED"),
        ("HS256 with the public key", hs256, "NOT_AN_ACCESS_TOKEN"),
        ("its own key in the header", embedded, "NOT_AN_ACCESS_TOKEN"),
        ("unknown kid", unknown_kid, "TOKEN_KEY_UNKNOWN"),
        ("expired", expired, "TOKEN_EXPIRED"),
        ("wrong audience", wrong_audience, "TOKEN_INVALID"),
        ("an upstream ID token", upstream, "NOT_AN_ACCESS_TOKEN"),
        ("not a JWT", "garbage".to_owned(), "TOKEN_MALFORMED"),
    ];
    for (case, token, why) in cases {
        let status = whoami(&fed, CENTRE, &token).await.expect_err(case);
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert_eq!(reason(&status), why, "{case}: {status:?}");
    }
    // The genuine token, presented by another member system.
    let status = whoami(&fed, INSTITUTION, &token).await.unwrap_err();
    assert_eq!(reason(&status), "TOKEN_OF_ANOTHER_SYSTEM", "{status:?}");
    // A token reaches no service: the forms service, for one, is called without it.
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_keep_earlier_tokens_valid_until_they_expire() {
    let World { fed, providers: _p } = world(Backend::Sqlite).await;
    let any = LevelOfAssurance::Unspecified;
    let first = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let old_token = tokens(&first).access_token.clone();
    let old_kid = kid_of(&old_token);
    // A newer key appears in the key directory, as when another replica rotates: made at the
    // same second as the first (its id sorts after it) and so already past its publication
    // lead, it signs as soon as the service reads the directory (every second here).
    let made = old_kid
        .trim_start_matches('k')
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    let new_kid = format!("k{made}-ffffffff");
    let (_, der) = SigningKey::generate(&new_kid).unwrap();
    let path = fed
        .data_dir
        .join("identity-keys")
        .join(format!("{new_kid}.p8"));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(&der).unwrap();
    }
    // Published and signing come together: wait until the key set names it.
    let mut desk = identity(&fed, CENTRE);
    let published = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            // Asked as fast as the gateway answers, the member may meet its rate limit first.
            let set = match desk.get_key_set(GetKeySetRequest {}).await {
                Ok(answer) => answer.into_inner().jwks_json,
                Err(status) if status.code() == Code::ResourceExhausted => String::new(),
                Err(status) => panic!("{status:?}"),
            };
            if set.contains(&new_kid) {
                break set;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the new key is published within 15 s");
    assert!(published.contains(&old_kid), "the old key stays published");
    let new_token = desk
        .refresh_session(RefreshSessionRequest {
            refresh_token: tokens(&first).refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap()
        .access_token;
    assert_eq!(kid_of(&new_token), new_kid);
    // The gateway learns the new key when it first meets it; the old key's token still works.
    whoami(&fed, CENTRE, &new_token).await.expect("the new key");
    whoami(&fed, CENTRE, &old_token).await.expect("the old key");
    fed.stop().await;
}

async fn refresh_tokens_rotate_and_a_reuse_ends_the_session(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    let any = LevelOfAssurance::Unspecified;
    let mut desk = identity(&fed, CENTRE);
    let first = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let refresh = |token: &str| RefreshSessionRequest {
        refresh_token: token.into(),
    };
    let first_refresh = tokens(&first).refresh_token.clone();
    let second = desk
        .refresh_session(refresh(&first_refresh))
        .await
        .unwrap()
        .into_inner()
        .tokens
        .unwrap();
    assert_ne!(second.refresh_token, first_refresh);
    whoami(&fed, CENTRE, &second.access_token).await.unwrap();
    // Another system cannot use this session's refresh token.
    let status = identity(&fed, INSTITUTION)
        .refresh_session(refresh(&second.refresh_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");
    // The first refresh token again: stolen or replayed. The session ends, and with it the
    // token that was still good.
    let status = desk
        .refresh_session(refresh(&first_refresh))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "REFRESH_TOKEN_REUSED");
    let status = desk
        .refresh_session(refresh(&second.refresh_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");

    // Two uses of one refresh token at the same moment: one wins, the other is a reuse, and
    // the session ends for the winner too.
    let raced = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let token = tokens(&raced).refresh_token.clone();
    let (mut a, mut b) = (desk.clone(), desk.clone());
    let (first, second) = tokio::join!(
        a.refresh_session(refresh(&token)),
        b.refresh_session(refresh(&token))
    );
    let (won, lost) = match (first, second) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won.into_inner(), lost),
        other => panic!("one refresh must win and one lose: {other:?}"),
    };
    assert_eq!(reason(&lost), "REFRESH_TOKEN_REUSED", "{lost:?}");
    let status = desk
        .refresh_session(refresh(&won.tokens.unwrap().refresh_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");

    // Logout ends a session too.
    let other = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    desk.logout(LogoutRequest {
        refresh_token: tokens(&other).refresh_token.clone(),
    })
    .await
    .unwrap();
    let status = desk
        .refresh_session(refresh(&tokens(&other).refresh_token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SESSION_ENDED");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_needing_high_refuses_a_lower_login_with_the_level() {
    let World { fed, providers: _p } = world(Backend::Sqlite).await;
    let substantial = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_SUBSTANTIAL,
        LevelOfAssurance::Unspecified,
    )
    .await
    .unwrap();
    let mut echo = EchoServiceClient::new(fed.gateway_client(CENTRE));
    let token = &tokens(&substantial).access_token;
    // Allowed at any level ...
    echo.whoami(bearer(WhoamiRequest {}, token)).await.unwrap();
    // ... but not where high is required: the refusal names the level to log in with.
    let status = echo
        .whoami_strict(bearer(WhoamiRequest {}, token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "LEVEL_OF_ASSURANCE_TOO_LOW");
    assert_eq!(required_level(&status), "high");
    // Without a person at all.
    let status = echo.whoami(WhoamiRequest {}).await.unwrap_err();
    assert_eq!(reason(&status), "PERSON_TOKEN_REQUIRED");
    // A member naming a person itself is not believed: the gateway drops the header.
    let forged = claims_of(token).to_header();
    let mut request = tonic::Request::new(WhoamiRequest {});
    request
        .metadata_mut()
        .insert("x-onestop-person", forged.parse().unwrap());
    let status = echo.whoami(request).await.unwrap_err();
    assert_eq!(reason(&status), "PERSON_TOKEN_REQUIRED");
    let mut request = bearer(WhoamiRequest {}, token);
    let mut other = claims_of(token);
    other.sub = format!("lv:{}", oidc::LV_RESIDENT_2_PERSONAL_CODE);
    request
        .metadata_mut()
        .insert("x-onestop-person", other.to_header().parse().unwrap());
    let seen = echo.whoami(request).await.unwrap().into_inner();
    assert_eq!(
        seen.subject,
        format!("lv:{}", oidc::LV_RESIDENT_PERSONAL_CODE)
    );
    // The step-up: a new login at high passes.
    let high = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        LevelOfAssurance::High,
    )
    .await
    .unwrap();
    echo.whoami_strict(bearer(WhoamiRequest {}, &tokens(&high).access_token))
        .await
        .unwrap();
    fed.stop().await;
}

fn principal() -> PersonId {
    PersonId {
        scheme: PersonIdScheme::LvPersonalCode as i32,
        value: oidc::LV_RESIDENT_2_PERSONAL_CODE.into(),
    }
}

pub(crate) fn in_days(days: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time::OffsetDateTime::now_utc().unix_timestamp() + days * 86_400,
        nanos: 0,
    }
}

async fn a_clerk_acts_for_a_resident_under_a_mandate_until_it_is_revoked(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    let any = LevelOfAssurance::Unspecified;
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let clerk_token = tokens(&clerk).access_token.clone();
    let mut desk = identity(&fed, CENTRE);
    let register = RegisterMandateRequest {
        request_id: "mandate-1".into(),
        principal: Some(principal()),
        services: vec![
            "vsaa-old-age-pension".into(),
            "vsaa-parental-benefit".into(),
        ],
        valid_from: None,
        valid_until: Some(in_days(90)),
        document_sha256: "ab".repeat(32),
        identity_document: IdentityDocument::IdCard as i32,
    };
    let mandate = desk
        .register_mandate(bearer(register.clone(), &clerk_token))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    assert_eq!(mandate.centre, oidc::GULBENE_CENTRE);
    // A retry returns the same mandate; the same id with other content is refused.
    let again = desk
        .register_mandate(bearer(register.clone(), &clerk_token))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    assert_eq!(again.name, mandate.name);
    let status = desk
        .register_mandate(bearer(
            RegisterMandateRequest {
                services: vec!["vsaa-other".into()],
                ..register.clone()
            },
            &clerk_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    // A mandate names services of the catalogue only.
    let status = desk
        .register_mandate(bearer(
            RegisterMandateRequest {
                request_id: "mandate-unknown-service".into(),
                services: vec!["vsaa-old-age-pension".into(), "vsaa-no-such-benefit".into()],
                ..register.clone()
            },
            &clerk_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = crate::violations(&status)
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["services[1]"], "{status:?}");

    // The clerk exchanges it for a token acting for the resident, for one of its services, and
    // calls through the gateway as the resident with the clerk as actor.
    let exchange = |services: Vec<&str>| ExchangeMandateRequest {
        name: mandate.name.clone(),
        services: services.into_iter().map(String::from).collect(),
    };
    let acting = desk
        .exchange_mandate(bearer(exchange(vec!["vsaa-old-age-pension"]), &clerk_token))
        .await
        .unwrap()
        .into_inner();
    let seen = whoami(&fed, CENTRE, &acting.access_token).await.unwrap();
    assert_eq!(
        seen.subject,
        format!("lv:{}", oidc::LV_RESIDENT_2_PERSONAL_CODE)
    );
    assert_eq!(
        seen.actor,
        format!(
            "staff:{}/{}",
            oidc::GULBENE_INSTITUTION,
            oidc::CLERK_GULBENE_STAFF_ID
        )
    );
    assert_eq!(
        seen.mandate_id,
        mandate.name.trim_start_matches("mandates/")
    );
    assert_eq!(seen.mandate_services, ["vsaa-old-age-pension"]);

    // It cannot be widened, used by a clerk of another centre, or by the acting token itself.
    let status = desk
        .exchange_mandate(bearer(exchange(vec!["vsaa-unemployment"]), &clerk_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let rugaji = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_RUGAJI,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let status = desk
        .exchange_mandate(bearer(exchange(vec![]), &tokens(&rugaji).access_token))
        .await
        .unwrap_err();
    // To another centre's clerk the mandate does not exist.
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = desk
        .exchange_mandate(bearer(exchange(vec![]), &acting.access_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A resident cannot register one.
    let owner = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT_2,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let owner_token = tokens(&owner).access_token.clone();
    let status = desk
        .register_mandate(bearer(
            RegisterMandateRequest {
                request_id: "by-resident".into(),
                ..register.clone()
            },
            &owner_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A mandate that starts later is not usable yet.
    let later = desk
        .register_mandate(bearer(
            RegisterMandateRequest {
                request_id: "mandate-later".into(),
                valid_from: Some(in_days(10)),
                ..register.clone()
            },
            &clerk_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    let status = desk
        .exchange_mandate(bearer(
            ExchangeMandateRequest {
                name: later.name.clone(),
                services: vec![],
            },
            &clerk_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The resident sees the mandates given in their name, and revokes one.
    let listed = desk
        .list_mandates(bearer(ListMandatesRequest::default(), &owner_token))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.mandates.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, [later.name.as_str(), mandate.name.as_str()]);
    let someone_else = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let theirs = desk
        .list_mandates(bearer(
            ListMandatesRequest::default(),
            &tokens(&someone_else).access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.mandates.is_empty(), "another resident sees none");
    let revoked = desk
        .revoke_mandate(bearer(
            RevokeMandateRequest {
                name: mandate.name.clone(),
                reason: "I can log in myself now".into(),
            },
            &owner_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    assert!(revoked.revoke_time.is_some());
    // Refused afterwards.
    let status = desk
        .exchange_mandate(bearer(exchange(vec![]), &clerk_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "MANDATE_NOT_USABLE");

    // Every registration, exchange and revocation is an audit event with its trace.
    let db = onestop_platform::db::open(
        &DatabaseConfig::at(&fed.databases["identity"]),
        &onestop_identity::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let events = onestop_identity::store::Store::new(db)
        .mandate_events(mandate.name.trim_start_matches("mandates/"))
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|(kind, _, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["mandate.registered", "mandate.exchanged", "mandate.revoked"]
    );
    assert!(
        events.iter().all(|(_, _, trace)| trace.len() == 32),
        "{events:?}"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_person_has_a_rate_of_their_own() {
    // Three calls at once, then one a second, per person.
    let World { fed, providers: _p } = world_with(Backend::Sqlite, |options| {
        options.person_rate = (1, 3);
    })
    .await;
    let any = LevelOfAssurance::Unspecified;
    let one = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let other = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT_2,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let token = &tokens(&one).access_token;
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = whoami(&fed, CENTRE, token).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("the person's rate is enforced");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "PERSON_RATE_LIMITED");
    // Another person of the same front end is not held back.
    whoami(&fed, CENTRE, &tokens(&other).access_token)
        .await
        .expect("another person's call");
    fed.stop().await;
}

/// Retries `call` until it fails with something other than the member's rate limit, for at
/// most 10 s, and returns the failure: for what reaches the gateway a moment later.
async fn refused_within_seconds<F, T>(mut call: impl FnMut() -> F) -> tonic::Status
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match call().await {
                Err(status) if status.code() != Code::ResourceExhausted => break status,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("refused within 10 s")
}

async fn a_login_is_completed_only_by_its_front_end_and_survives_a_timeout(backend: Backend) {
    let World { fed, providers } = world(backend).await;
    let any = LevelOfAssurance::Unspecified;
    let resident = Login {
        account: oidc::LV_RESIDENT,
        acr: oidc::ACR_HIGH,
    };
    // Another front end presents the (state, code) pair it caught on the way: refused, and the
    // login is still there for the desk that started it.
    let started = start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap();
    let back = oidc::browse(&started.authorization_url, &resident)
        .await
        .unwrap();
    let pair = CompleteLoginRequest {
        state: started.state,
        code: back.code.unwrap(),
        ..Default::default()
    };
    let status = identity(&fed, INSTITUTION)
        .complete_login(pair.clone())
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "UNKNOWN_LOGIN", "{status:?}");
    identity(&fed, CENTRE)
        .complete_login(pair)
        .await
        .expect("the desk completes its own login");

    // The provider is slow and the desk gives up waiting: the login is not used up, and the
    // desk completes it when it tries again.
    let started = start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap();
    let back = oidc::browse(&started.authorization_url, &resident)
        .await
        .unwrap();
    let pair = CompleteLoginRequest {
        state: started.state,
        code: back.code.unwrap(),
        ..Default::default()
    };
    providers
        .delay_next_token_response(oidc::RESIDENT_PROVIDER, std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let mut impatient = tonic::Request::new(pair.clone());
    impatient.set_timeout(std::time::Duration::from_millis(500));
    let status = identity(&fed, CENTRE)
        .complete_login(impatient)
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    identity(&fed, CENTRE)
        .complete_login(pair)
        .await
        .expect("the login outlives a completion that timed out");
    assert_eq!(sessions(&fed).await, 2);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_s_new_signing_key_is_fetched_at_once() {
    let World { fed, providers } = world(Backend::Sqlite).await;
    let any = LevelOfAssurance::Unspecified;
    // The provider's keys are discovered and kept with the first login.
    login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    // The provider rotates: its next ID token names a key the service has not seen.
    providers
        .rotate_signing_key(oidc::RESIDENT_PROVIDER)
        .await
        .unwrap();
    login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .expect("an ID token signed with the provider's new key");
    fed.stop().await;
}

async fn logout_reaches_the_gateway_within_seconds(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    let any = LevelOfAssurance::Unspecified;
    let [ended, other] = [oidc::LV_RESIDENT, oidc::LV_RESIDENT_2];
    let ended = login(&fed, CENTRE, "residents", ended, oidc::ACR_HIGH, any)
        .await
        .unwrap();
    let other = login(&fed, CENTRE, "residents", other, oidc::ACR_HIGH, any)
        .await
        .unwrap();
    let token = tokens(&ended).access_token.clone();
    whoami(&fed, CENTRE, &token).await.expect("before logout");
    identity(&fed, CENTRE)
        .logout(LogoutRequest {
            refresh_token: tokens(&ended).refresh_token.clone(),
        })
        .await
        .unwrap();
    // The access token has minutes to live, but its session is over. (One connection for all
    // the tries: a new one per try would meet the gateway's connection limits.)
    let echo = EchoServiceClient::new(fed.gateway_client(CENTRE));
    let status = refused_within_seconds(|| {
        let mut echo = echo.clone();
        let request = bearer(WhoamiRequest {}, &token);
        async move { echo.whoami(request).await }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "SESSION_ENDED", "{status:?}");
    // Which sessions ended is for the platform's components, not for members.
    let status = identity(&fed, CENTRE)
        .list_ended_sessions(ListEndedSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Another session goes on (once the member's rate, spent by the tries above, allows).
    let other = tokens(&other).access_token.clone();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match whoami(&fed, CENTRE, &other).await {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::task::yield_now().await
                }
                answer => break answer,
            }
        }
    })
    .await
    .expect("an answer within 10 s")
    .expect("another session's token");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_their_cause() {
    let World { fed, providers } = world(Backend::Sqlite).await;
    let any = LevelOfAssurance::Unspecified;
    let start_residents = || start(&fed, CENTRE, "residents", oidc::DESK_REDIRECT_URI, any);

    // Discovery naming another issuer: the operator hears which, not "try again later".
    providers
        .override_discovery(
            oidc::RESIDENT_PROVIDER,
            serde_json::json!({"issuer": "https://elsewhere.example"}),
        )
        .await
        .unwrap();
    let status = start_residents().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "PROVIDER_ISSUER_MISMATCH", "{status:?}");
    assert!(
        status.message().contains("https://elsewhere.example"),
        "{status:?}"
    );
    // Its keys on another origin: refused, and said so.
    providers
        .override_discovery(
            oidc::RESIDENT_PROVIDER,
            serde_json::json!({"jwks_uri": "http://127.0.0.1:9/jwks"}),
        )
        .await
        .unwrap();
    let status = start_residents().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason(&status),
        "PROVIDER_ENDPOINT_ON_ANOTHER_ORIGIN",
        "{status:?}"
    );
    assert!(
        status.message().contains("http://127.0.0.1:9/jwks"),
        "{status:?}"
    );
    providers
        .override_discovery(oidc::RESIDENT_PROVIDER, serde_json::Value::Null)
        .await
        .unwrap();

    // Malformed ID tokens are refusals, not an unavailable provider.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (case, claims, why) in [
        (
            "acr as an array",
            serde_json::json!({"acr": [oidc::ACR_HIGH]}),
            "ID_TOKEN_MALFORMED",
        ),
        (
            "no sub",
            serde_json::json!({"sub": null}),
            "ID_TOKEN_MALFORMED",
        ),
        (
            "issued in the future",
            serde_json::json!({"iat": now + 3600}),
            "LOGIN_REFUSED",
        ),
        (
            "not valid before an hour from now",
            serde_json::json!({"nbf": now + 3600}),
            "LOGIN_REFUSED",
        ),
        (
            "an acr not configured",
            serde_json::json!({"acr": "urn:elsewhere:loa:9"}),
            "LOGIN_REFUSED",
        ),
    ] {
        providers
            .tamper_next_id_token(oidc::RESIDENT_PROVIDER, claims)
            .await
            .unwrap();
        let status = login(
            &fed,
            CENTRE,
            "residents",
            oidc::LV_RESIDENT,
            oidc::ACR_HIGH,
            any,
        )
        .await
        .expect_err(case);
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert_eq!(reason(&status), why, "{case}: {status:?}");
        assert!(
            !status.message().contains("Some(") && !status.message().contains("None"),
            "{case}: {status:?}"
        );
    }
    let status = {
        providers
            .tamper_next_id_token(
                oidc::RESIDENT_PROVIDER,
                serde_json::json!({"acr": "urn:elsewhere:loa:9"}),
            )
            .await
            .unwrap();
        login(
            &fed,
            CENTRE,
            "residents",
            oidc::LV_RESIDENT,
            oidc::ACR_HIGH,
            any,
        )
        .await
        .unwrap_err()
    };
    assert!(
        status.message().contains("urn:elsewhere:loa:9"),
        "{status:?}"
    );

    // The staff provider takes client_secret_post only, as its discovery says; its roles may
    // come as one space-separated string.
    providers
        .tamper_next_id_token(
            oidc::STAFF_PROVIDER,
            serde_json::json!({"roles": "clerk specialist"}),
        )
        .await
        .unwrap();
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .expect("a staff login with client_secret_post");
    let Some(person::Subject::Staff(staff)) = clerk.person.unwrap().subject else {
        panic!("a staff member");
    };
    assert_eq!(staff.roles, [oidc::ROLE_CLERK, oidc::ROLE_SPECIALIST]);
    // Roles that are neither: refused, with the claim named.
    providers
        .tamper_next_id_token(oidc::STAFF_PROVIDER, serde_json::json!({"roles": {"a": 1}}))
        .await
        .unwrap();
    let status = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&status), "ID_TOKEN_MALFORMED", "{status:?}");
    assert!(status.message().contains("roles"), "{status:?}");

    // The person declined at the provider, which sent `error=access_denied` back.
    let started = start_residents().await.unwrap();
    let status = identity(&fed, CENTRE)
        .complete_login(CompleteLoginRequest {
            state: started.state.clone(),
            error: "access_denied".into(),
            error_description: "The user declined".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "LOGIN_DENIED_AT_PROVIDER", "{status:?}");
    assert!(status.message().contains("access_denied"), "{status:?}");
    // And the login is over.
    let status = identity(&fed, CENTRE)
        .complete_login(CompleteLoginRequest {
            state: started.state,
            code: "anything".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "UNKNOWN_LOGIN", "{status:?}");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_on_a_private_ca_is_trusted_through_its_ca_file() {
    // A municipality's provider on HTTPS, its certificate from the municipality's own CA.
    let dir = tempfile::tempdir().unwrap();
    let ca = onestop_platform::pki::Ca::generate("municipality.test").unwrap();
    let served = ca
        .issue(
            &onestop_platform::pki::IssueRequest::new(
                "login.municipality.test",
                None,
                std::time::Duration::from_secs(3600),
            )
            .serving_localhost(),
        )
        .unwrap();
    served.save(dir.path(), "provider").unwrap();
    let ca_file = dir.path().join("municipality-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let providers = Providers::start_with_tls(
        &dir.path().join("provider.pem"),
        &dir.path().join("provider.key"),
    )
    .await
    .unwrap();
    let issuer = providers.tls.clone().expect("the HTTPS provider");
    let acr = format!("[providers.acr]\n\"{}\" = \"high\"\n", oidc::ACR_HIGH);
    let provider = |id: &str, ca: &str| {
        format!(
            "[[providers]]\nid = \"{id}\"\nissuer = \"{issuer}\"\nclient_id = \"{}\"\n\
             client_secret_file = \"oidc-secret\"\nscopes = [\"{}\"]\naudience = \"residents\"\n\
             {ca}{acr}\n",
            oidc::CLIENT_ID,
            oidc::IDENTITY_SCOPE,
        )
    };
    let more = format!(
        "{}{}",
        provider(
            "municipality",
            &format!("ca_file = \"{}\"\n", ca_file.display())
        ),
        provider("untrusted", ""),
    );
    let World { fed, providers: _p } = world_of(Backend::Sqlite, providers, more, |_| {}).await;
    let any = LevelOfAssurance::Unspecified;
    let started = start(&fed, CENTRE, "municipality", oidc::DESK_REDIRECT_URI, any)
        .await
        .expect("discovery over HTTPS with the provider's CA");
    assert!(
        started.authorization_url.starts_with(&format!("{issuer}/")),
        "{}",
        started.authorization_url
    );
    // The same provider without its CA: the public roots do not vouch for it.
    let status = start(&fed, CENTRE, "untrusted", oidc::DESK_REDIRECT_URI, any)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "PROVIDER_UNAVAILABLE", "{status:?}");
    fed.stop().await;
}
