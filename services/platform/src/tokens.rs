//! Platform tokens: the short-lived access tokens the identity service issues to people, and
//! the one verifier every part of the platform checks them with.
//!
//! A token is a JWT signed with ES256 (`typ` `at+jwt`, RFC 9068). It says who (`sub`), how
//! (`auth`: provider, level of assurance, country, time), for staff their institution, centre
//! and roles, for a mandate the acting clerk (`act`, RFC 8693) and the mandate's scope, and the
//! member system it was issued to (`cid`): presented by any other system it is refused.
//!
//! The verifier pins the algorithm and the token type and trusts only keys of its key set (the
//! identity service's, by `kid`): `alg=none`, HMAC signed with a public key, keys embedded in
//! the header (`jwk`, `jku`, `x5u`, `x5c`) and ID tokens of upstream providers (another `typ`,
//! issuer and key) are all refused.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::identity::Member;
use crate::person::{EidasId, Level};

/// The `typ` header of access tokens.
pub const TOKEN_TYPE: &str = "at+jwt";

/// The only algorithm: ECDSA on P-256 with SHA-256.
pub const ALGORITHM: Algorithm = Algorithm::ES256;

/// How far clocks may disagree when checking `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The longest token accepted, in bytes, before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The issuer of a trust domain's tokens.
pub fn issuer(trust_domain: &str) -> String {
    format!("https://{trust_domain}/identity")
}

/// The audience of a trust domain's tokens: the platform as a whole.
pub fn audience(trust_domain: &str) -> String {
    format!("https://{trust_domain}")
}

/// Who a token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A person with a Latvian personal code (`DDMMYY-NNNNN`).
    Resident(String),
    /// A person identified by another country's eID means.
    Foreign(EidasId),
    /// A member of staff of an institution.
    Staff {
        /// The institution (`CLASS/CODE`).
        institution: Member,
        /// Their id there.
        staff_id: String,
    },
}

impl Subject {
    /// Parses the `sub` form: `lv:<code>`, `eidas:<CC/DD/id>`, `staff:<CLASS>/<CODE>/<id>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(code) = text.strip_prefix("lv:") {
            return crate::person::normalize_personal_code(code).map(Subject::Resident);
        }
        if let Some(id) = text.strip_prefix("eidas:") {
            return EidasId::parse(id).map(Subject::Foreign);
        }
        if let Some(rest) = text.strip_prefix("staff:") {
            let mut parts = rest.splitn(3, '/');
            if let (Some(class), Some(code), Some(staff_id)) =
                (parts.next(), parts.next(), parts.next())
                && !staff_id.is_empty()
            {
                let institution = Member::parse(&format!("{class}/{code}"))
                    .map_err(|e| format!("staff subject: {e}"))?;
                return Ok(Subject::Staff {
                    institution,
                    staff_id: staff_id.to_owned(),
                });
            }
        }
        Err(format!(
            "`{}` is not a subject (lv:, eidas: or staff:)",
            crate::status::echo(text)
        ))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Resident(code) => write!(f, "lv:{code}"),
            Subject::Foreign(id) => write!(f, "eidas:{id}"),
            Subject::Staff {
                institution,
                staff_id,
            } => write!(f, "staff:{}/{staff_id}", institution.institution()),
        }
    }
}

/// How a person was identified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authentication {
    /// The login provider's id.
    pub provider: String,
    /// The level of assurance.
    pub level: Level,
    /// The country whose eID means were used, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// When the person authenticated at the provider (seconds since the epoch).
    pub time: i64,
}

/// A staff member's place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staff {
    /// Their institution, `CLASS/CODE`.
    pub institution: String,
    /// Their centre, if they work at one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub centre: Option<String>,
    /// Their roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl Staff {
    /// Whether they have `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// The clerk acting under a mandate (RFC 8693 `act`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The clerk's subject (`staff:...`).
    pub sub: String,
    /// Where the clerk works.
    pub staff: Staff,
}

/// What a mandate lets the actor do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MandateScope {
    /// The mandate's id.
    pub id: String,
    /// The catalogue services covered.
    pub services: Vec<String>,
    /// SHA-256 (hex) of the resident's signed written authorisation, so that what is filed
    /// under the mandate names the document it rests on.
    #[serde(default)]
    pub authorisation_sha256: String,
}

/// The claims of an access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The issuer ([`issuer`]).
    pub iss: String,
    /// The audience ([`audience`]).
    pub aud: String,
    /// Who ([`Subject`] in its text form).
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issue time.
    pub iat: i64,
    /// Not valid before.
    pub nbf: i64,
    /// The token's own id.
    pub jti: String,
    /// The member system it was issued to (its SPIFFE id).
    pub cid: String,
    /// The session it belongs to (none for a token acting under a mandate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// How the subject was identified (for a mandate: how the actor was).
    pub auth: Authentication,
    /// Given name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    /// Family name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    /// For staff: where they work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<Staff>,
    /// For a token acting under a mandate: the clerk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// For a token acting under a mandate: the mandate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mandate: Option<MandateScope>,
}

impl Claims {
    /// The subject, parsed.
    pub fn subject(&self) -> Result<Subject, String> {
        Subject::parse(&self.sub)
    }

    /// The claims as the gateway passes them to services (base64url JSON).
    pub fn to_header(&self) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Claims passed by the gateway.
    pub fn from_header(value: &str) -> Result<Self, String> {
        let json = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|e| format!("not base64url: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| format!("not the claims: {e}"))
    }
}

/// Why a token is refused. Every case is `UNAUTHENTICATED` to the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or over [`MAX_TOKEN_BYTES`].
    #[error("the bearer token is malformed: {0}")]
    Malformed(String),
    /// Signed with another algorithm, of another type, or carrying its own key.
    #[error("the bearer token is not a platform access token: {0}")]
    NotAccessToken(String),
    /// Signed with a key the verifier does not know (perhaps a new one: fetch the key set).
    #[error("the bearer token is signed with an unknown key `{0}`")]
    UnknownKey(String),
    /// The signature or a claim (issuer, audience, times) is wrong.
    #[error("the bearer token is invalid: {0}")]
    Invalid(String),
    /// Expired.
    #[error("the bearer token has expired; refresh the session")]
    Expired,
    /// Presented by a system other than the one it was issued to.
    #[error("the bearer token was issued to another system")]
    OtherSystem,
    /// Its session has ended (logged out, or ended because a refresh token was used twice).
    #[error("the bearer token's session has ended; log in again")]
    SessionEnded,
}

impl TokenError {
    /// The stable reason for `ErrorInfo`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "TOKEN_MALFORMED",
            TokenError::NotAccessToken(_) => "NOT_AN_ACCESS_TOKEN",
            TokenError::UnknownKey(_) => "TOKEN_KEY_UNKNOWN",
            TokenError::Invalid(_) => "TOKEN_INVALID",
            TokenError::Expired => "TOKEN_EXPIRED",
            TokenError::OtherSystem => "TOKEN_OF_ANOTHER_SYSTEM",
            TokenError::SessionEnded => "SESSION_ENDED",
        }
    }
}

/// A key that signs tokens: an ECDSA P-256 key pair and its id.
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key, and its PKCS#8 document (to keep it).
    pub fn generate(kid: &str) -> Result<(Self, Vec<u8>), String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| "generating a P-256 key failed".to_owned())?;
        let key = Self::from_pkcs8(kid, pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// The key in a PKCS#8 document.
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> Result<Self, String> {
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| format!("key {kid}: not a P-256 PKCS#8 key: {e}"))?;
        use ring::signature::KeyPair;
        Ok(Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(pkcs8),
            public: pair.public_key().as_ref().to_vec(),
        })
    }

    /// Its id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs claims as an access token.
    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let mut header = Header::new(ALGORITHM);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| e.to_string())
    }

    /// Its public half as a JWK (RFC 7517).
    pub fn jwk(&self) -> serde_json::Value {
        // An uncompressed point: 0x04, then x and y, 32 bytes each.
        let (x, y) = self.public[1..].split_at(32);
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "alg": "ES256",
            "use": "sig",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        })
    }
}

/// The JWK set of keys.
pub fn key_set<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> String {
    let keys: Vec<_> = keys.into_iter().map(SigningKey::jwk).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// Checks access tokens against a key set, shared by every thread that verifies.
pub struct Verifier {
    validation: Validation,
    keys: RwLock<Arc<HashMap<String, DecodingKey>>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.validation.iss)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier of the trust domain's tokens, with no keys yet.
    pub fn new(trust_domain: &str) -> Self {
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[issuer(trust_domain)]);
        validation.set_audience(&[audience(trust_domain)]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Self {
            validation,
            keys: RwLock::new(Arc::new(HashMap::new())),
        }
    }

    /// Replaces the keys with those of a JWK set; returns how many it holds. Keys that are not
    /// ES256 signing keys are left out.
    pub fn set_keys(&self, jwks_json: &str) -> Result<usize, String> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Jwk>,
        }
        #[derive(Deserialize)]
        struct Jwk {
            kty: String,
            #[serde(default)]
            crv: String,
            #[serde(default)]
            alg: Option<String>,
            #[serde(default, rename = "use")]
            usage: Option<String>,
            kid: String,
            #[serde(default)]
            x: String,
            #[serde(default)]
            y: String,
        }
        let set: Set =
            serde_json::from_str(jwks_json).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in set.keys {
            let usable = jwk.kty == "EC"
                && jwk.crv == "P-256"
                && jwk.alg.as_deref().is_none_or(|a| a == "ES256")
                && jwk.usage.as_deref().is_none_or(|u| u == "sig");
            if !usable {
                continue;
            }
            let key = DecodingKey::from_ec_components(&jwk.x, &jwk.y)
                .map_err(|e| format!("key {}: {e}", jwk.kid))?;
            keys.insert(jwk.kid, key);
        }
        let count = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(count)
    }

    /// Whether a key of this id is known.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(kid)
    }

    /// The key id a token names, if it names one (to tell whether to fetch the key set).
    pub fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid)
    }

    /// Verifies a token presented by the member system `presenter` (its SPIFFE id).
    pub fn verify(&self, token: &str, presenter: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != ALGORITHM {
            return Err(TokenError::NotAccessToken(format!(
                "algorithm {:?}, not ES256",
                header.alg
            )));
        }
        if header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenError::NotAccessToken(format!(
                "type {:?}, not {TOKEN_TYPE}",
                header.typ
            )));
        }
        if header.jwk.is_some()
            || header.jku.is_some()
            || header.x5u.is_some()
            || header.x5c.is_some()
        {
            return Err(TokenError::NotAccessToken(
                "it carries its own key (jwk, jku, x5u or x5c)".into(),
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::NotAccessToken("no key id".into()))?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let key = keys
            .get(&kid)
            .ok_or_else(|| TokenError::UnknownKey(crate::status::echo(&kid).into_owned()))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid(e.to_string()),
                }
            })?;
        let claims = data.claims;
        if claims.cid != presenter {
            return Err(TokenError::OtherSystem);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: issuer("onestop.lv"),
            aud: audience("onestop.lv"),
            sub: "lv:010170-10008".into(),
            exp: now + 300,
            iat: now,
            nbf: now,
            jti: "t1".into(),
            cid: "spiffe://onestop.lv/member/MUN/GULBENE/portal".into(),
            sid: Some("s1".into()),
            auth: Authentication {
                provider: "latvija".into(),
                level: Level::High,
                country: Some("LV".into()),
                time: now,
            },
            given_name: None,
            family_name: None,
            staff: None,
            act: None,
            mandate: None,
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn a_signed_token_verifies_and_its_claims_survive_the_header() {
        let (key, _) = SigningKey::generate("k1").unwrap();
        let verifier = Verifier::new("onestop.lv");
        assert_eq!(verifier.set_keys(&key_set([&key])).unwrap(), 1);
        let claims = claims(now());
        let token = key.sign(&claims).unwrap();
        let verified = verifier.verify(&token, &claims.cid).unwrap();
        assert_eq!(verified, claims);
        assert_eq!(Claims::from_header(&verified.to_header()).unwrap(), claims);
        assert_eq!(
            verifier.verify(&token, "spiffe://onestop.lv/member/GOV/VSAA/x"),
            Err(TokenError::OtherSystem)
        );
        let mut expired = claims.clone();
        expired.exp = now() - 3600;
        assert_eq!(
            verifier.verify(&key.sign(&expired).unwrap(), &claims.cid),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn subjects_round_trip() {
        for text in [
            "lv:010170-10008",
            "eidas:EE/LV/38001085718",
            "staff:MUN/GULBENE/j.ozola",
        ] {
            assert_eq!(Subject::parse(text).unwrap().to_string(), text);
        }
        assert!(Subject::parse("lv:010170-10005").is_err());
        assert!(Subject::parse("someone").is_err());
    }
}
