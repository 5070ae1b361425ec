//! Page sizes and page tokens of List methods.
//!
//! A page token carries the key of the last item of the page it follows, so that pages stay
//! stable while items are added, and an HMAC-SHA256 over that key and the [`Query`] that issued
//! it. A client cannot make or alter a token, nor carry one over to another List method or to
//! the same method with other filters: each of these is refused as an invalid `page_token`.
//!
//! Tokens are opaque by contract, not secret: they hold nothing the caller was not shown (the
//! last item of the page). The key that signs them is a service's [`PageTokens::new_secret`],
//! kept where every replica reads it (the service's database), so that a token outlives a
//! restart and works at any replica.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The page size when the caller asks for none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: u32 = 100;
/// The longest page key a token may carry, in bytes; a longer one makes a token that
/// [`PageTokens::resume`] refuses.
pub const MAX_KEY_BYTES: usize = 1024;

/// The first byte of every token, so that the layout can change without misreading old tokens.
const TOKEN_VERSION: u8 = 1;
/// The name under which a service's database keeps the key that signs its page tokens.
pub const SECRET_NAME: &str = "page_token_key";
/// Separates these MACs from any other use of the same secret.
const MAC_CONTEXT: &[u8] = b"onestop page token v1";
/// The length of an HMAC-SHA256 tag.
const TAG_BYTES: usize = 32;
/// The length of a secret, in bytes (it is written as twice as many hexadecimal digits).
const SECRET_BYTES: usize = 32;
/// The longest token accepted: the version, the longest key and the tag, in base64.
const MAX_TOKEN_CHARS: usize = (1 + MAX_KEY_BYTES + TAG_BYTES).div_ceil(3) * 4;

/// Checks a requested page size: 0 means the default, 1-100 are kept, anything else is an error
/// message about the field.
pub fn page_size(requested: i32) -> Result<u32, String> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=100 => Ok(requested.unsigned_abs()),
        _ => Err(format!(
            "page_size must be between 0 and {MAX_PAGE_SIZE}, not {requested}"
        )),
    }
}

/// Why page tokens cannot be issued.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The secret is not 64 hexadecimal digits.
    #[error("a page token secret must be {} hexadecimal digits", SECRET_BYTES * 2)]
    BadSecret,
    /// The operating system gave no random bytes for a new secret.
    #[error("no random bytes for a page token secret")]
    NoRandomness,
}

/// What a page token is bound to: the List method and every request parameter that chooses or
/// orders its items (not the page size, which may change from page to page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// Each part with its length before it, so that no two queries encode alike.
    encoded: Vec<u8>,
}

impl Query {
    /// The query of `method`, as the gRPC method is named (`ListForms`).
    pub fn new(method: &str) -> Self {
        let mut query = Self {
            encoded: Vec::new(),
        };
        query.push(method);
        query
    }

    /// Adds a parameter: a token issued with one value of it is refused with another.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.push(name);
        self.push(value);
        self
    }

    fn push(&mut self, part: &str) {
        self.encoded
            .extend_from_slice(&(part.len() as u64).to_be_bytes());
        self.encoded.extend_from_slice(part.as_bytes());
    }
}

/// Issues and reads the page tokens of one service.
#[derive(Clone)]
pub struct PageTokens {
    /// The HMAC-SHA256 key (ring, the platform's one cryptographic library).
    key: hmac::Key,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens")
    }
}

impl PageTokens {
    /// A new random secret, as 64 hexadecimal digits. A service makes one once and keeps it
    /// where every replica reads it; one made per process would refuse the tokens of a
    /// restarted or another replica.
    pub fn new_secret() -> Result<String, PagingError> {
        let mut bytes = [0u8; SECRET_BYTES];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| PagingError::NoRandomness)?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Tokens signed with the key a service's database keeps (made on its first start), so
    /// that every replica and every restart accepts them.
    pub async fn open(db: &crate::db::Database) -> Result<Self, crate::db::StoreError> {
        let fresh = Self::new_secret()
            .map_err(|e| crate::db::StoreError::Corrupt(format!("page tokens: {e}")))?;
        let secret = db.shared_secret(SECRET_NAME, &fresh).await?;
        Self::new(&secret)
            .map_err(|e| crate::db::StoreError::Corrupt(format!("{SECRET_NAME}: {e}")))
    }

    /// Tokens signed with `secret`, as made by [`PageTokens::new_secret`].
    pub fn new(secret: &str) -> Result<Self, PagingError> {
        let key = from_hex(secret)
            .filter(|key| key.len() == SECRET_BYTES)
            .ok_or(PagingError::BadSecret)?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        })
    }

    /// The token of the page after the item whose key is `last_key`, for `query`.
    pub fn issue(&self, query: &Query, last_key: &str) -> String {
        let mut token = Vec::with_capacity(1 + last_key.len() + TAG_BYTES);
        token.push(TOKEN_VERSION);
        token.extend_from_slice(last_key.as_bytes());
        token.extend_from_slice(&self.tag(query, last_key.as_bytes()));
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The key after which the page `token` asks for starts, or `None` for the first page (an
    /// empty token). The error is a message about the `page_token` field: the token is not one
    /// this service issued for `query`.
    pub fn resume(&self, query: &Query, token: &str) -> Result<Option<String>, String> {
        if token.is_empty() {
            return Ok(None);
        }
        let refused = || {
            "page_token is not a token this service issued for this request: pass back the \
             next_page_token of the previous page, with the same parameters"
                .to_owned()
        };
        if token.len() > MAX_TOKEN_CHARS {
            return Err(refused());
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| refused())?;
        let Some((&TOKEN_VERSION, rest)) = bytes.split_first() else {
            return Err(refused());
        };
        let Some(split) = rest.len().checked_sub(TAG_BYTES) else {
            return Err(refused());
        };
        let (key, tag) = rest.split_at(split);
        if !same(&self.tag(query, key), tag) {
            return Err(refused());
        }
        String::from_utf8(key.to_vec())
            .map(Some)
            .map_err(|_| refused())
    }

    fn tag(&self, query: &Query, key: &[u8]) -> Vec<u8> {
        let mut message =
            Vec::with_capacity(MAC_CONTEXT.len() + 16 + query.encoded.len() + key.len());
        message.extend_from_slice(MAC_CONTEXT);
        message.extend_from_slice(&(query.encoded.len() as u64).to_be_bytes());
        message.extend_from_slice(&query.encoded);
        message.extend_from_slice(key);
        hmac::sign(&self.key, &message).as_ref().to_vec()
    }
}

/// Compares two tags in time that does not depend on where they differ, so that a forger
/// learns nothing from how long a refusal takes.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digits = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(digits, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_tokens() -> PageTokens {
        PageTokens::new(&PageTokens::new_secret().unwrap()).unwrap()
    }

    fn forms() -> Query {
        Query::new("ListForms").with("owner", "")
    }

    #[test]
    fn page_sizes_are_checked() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert!(page_size(101).is_err());
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip() {
        let tokens = fresh_tokens();
        let token = tokens.issue(&forms(), "vsaa-old-age-pension");
        assert_eq!(
            tokens.resume(&forms(), &token).unwrap().as_deref(),
            Some("vsaa-old-age-pension")
        );
        assert_eq!(tokens.resume(&forms(), "").unwrap(), None);
        let longest = "k".repeat(MAX_KEY_BYTES);
        let token = tokens.issue(&forms(), &longest);
        assert_eq!(tokens.resume(&forms(), &token).unwrap(), Some(longest));
    }

    #[test]
    fn a_token_works_only_for_the_query_that_issued_it() {
        let tokens = fresh_tokens();
        let token = tokens.issue(&forms(), "nva-unemployed-registration");
        let other_filter = Query::new("ListForms").with("owner", "GOV/VSAA");
        let other_method = Query::new("ListFormVersions").with("owner", "");
        assert!(tokens.resume(&other_filter, &token).is_err());
        assert!(tokens.resume(&other_method, &token).is_err());
        // Parts are length-prefixed: moving a boundary makes another query.
        let a = Query::new("List").with("ab", "c");
        let b = Query::new("List").with("a", "bc");
        assert!(tokens.resume(&b, &tokens.issue(&a, "x")).is_err());
    }

    #[test]
    fn altered_forged_and_foreign_tokens_are_refused() {
        let tokens = fresh_tokens();
        let token = tokens.issue(&forms(), "nva-unemployed-registration");
        // Every single-character change is caught.
        for at in 0..token.len() {
            let mut altered = token.clone().into_bytes();
            altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(altered).unwrap();
            assert!(
                tokens.resume(&forms(), &altered).is_err(),
                "changed at {at}"
            );
        }
        // The old layout (the key in base64) and a key moved into a valid token's frame.
        let old = URL_SAFE_NO_PAD.encode("vsaa-old-age-pension");
        assert!(tokens.resume(&forms(), &old).is_err());
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes.splice(1..4, *b"zzz");
        assert!(
            tokens
                .resume(&forms(), &URL_SAFE_NO_PAD.encode(bytes))
                .is_err()
        );
        // Another service's (or another secret's) token, garbage and oversized text.
        assert!(fresh_tokens().resume(&forms(), &token).is_err());
        assert!(tokens.resume(&forms(), "***").is_err());
        assert!(tokens.resume(&forms(), "AQ").is_err());
        let huge = "A".repeat(MAX_TOKEN_CHARS + 4);
        assert!(tokens.resume(&forms(), &huge).is_err());
    }

    #[test]
    fn the_same_secret_reads_the_same_tokens() {
        let secret = PageTokens::new_secret().unwrap();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, PageTokens::new_secret().unwrap());
        let token = PageTokens::new(&secret).unwrap().issue(&forms(), "x");
        let restarted = PageTokens::new(&secret).unwrap();
        assert_eq!(
            restarted.resume(&forms(), &token).unwrap().as_deref(),
            Some("x")
        );
        assert!(PageTokens::new("abc").is_err());
        assert!(PageTokens::new(&"zz".repeat(32)).is_err());
        assert!(PageTokens::new(&"ab".repeat(16)).is_err());
    }
}
