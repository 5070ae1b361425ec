//! Page sizes and page tokens of List methods: a token is the opaque, URL-safe encoding of the
//! last key of the previous page, so that pages stay stable while items are added.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The page size when the caller asks for none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page.
pub const MAX_PAGE_SIZE: u32 = 100;

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

/// The token of the page after `last_key`.
pub fn encode_token(last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(last_key.as_bytes())
}

/// The key after which a page starts; `None` for the first page.
pub fn decode_token(token: &str) -> Result<Option<String>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > 512 {
        return Err("page_token is too long".into());
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or_else(|| "page_token is not a token this service issued".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        assert_eq!(
            decode_token(&encode_token("forms/x")).unwrap().as_deref(),
            Some("forms/x")
        );
        assert_eq!(decode_token("").unwrap(), None);
        assert!(decode_token("***").is_err());
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert!(page_size(101).is_err());
        assert!(page_size(-1).is_err());
    }
}
