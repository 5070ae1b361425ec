//! The evidence log's format, as anyone verifying it offline sees it (docs/evidence.md says the
//! same in prose): records in a canonical JSON encoding, each signed with Ed25519; the log as a
//! Merkle tree in the manner of Certificate Transparency (RFC 6962 / RFC 9162): leaf and node
//! hashes, the root, inclusion and consistency proofs; signed tree heads; and a message's
//! bundle with its verifier, which reports the first thing that fails. Pure functions, no I/O.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// A leaf's hash: SHA-256(0x00 || record).
pub fn leaf_hash(record: &[u8]) -> Hash {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(&[0]);
    context.update(record);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// An inner node's hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(&[1]);
    context.update(left);
    context.update(right);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// The largest power of two smaller than `n` (n > 1): where RFC 6962 splits a tree.
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// A Merkle tree over leaf hashes (RFC 6962, 2.1), with every complete, aligned subtree's hash
/// kept (about twice the leaves), so that the root and any proof cost a few dozen hashes
/// rather than a pass over the whole log.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// `levels[k][j]`: the hash of leaves `j·2^k .. (j+1)·2^k`.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// The tree of `leaves` (leaf hashes).
    pub fn new(leaves: &[Hash]) -> Self {
        let mut levels = vec![leaves.to_vec()];
        while let Some(below) = levels.last().filter(|l| l.len() > 1) {
            let above = below
                .chunks_exact(2)
                .map(|pair| node_hash(&pair[0], &pair[1]))
                .collect();
            levels.push(above);
        }
        Self { levels }
    }

    /// How many leaves it has.
    pub fn size(&self) -> usize {
        self.levels[0].len()
    }

    /// MTH of leaves `start..end` (a subtree RFC 6962 names: its left parts are always
    /// complete and aligned).
    fn subtree(&self, start: usize, end: usize) -> Hash {
        let n = end - start;
        if n == 0 {
            return sha256(b"");
        }
        if n.is_power_of_two() && start.is_multiple_of(n) {
            return self.levels[n.trailing_zeros() as usize][start / n];
        }
        let k = split(n);
        node_hash(
            &self.subtree(start, start + k),
            &self.subtree(start + k, end),
        )
    }

    /// The root.
    pub fn root(&self) -> Hash {
        self.subtree(0, self.size())
    }

    /// The inclusion proof (audit path, RFC 6962 2.1.1) of leaf `index`.
    pub fn inclusion_proof(&self, index: u64) -> Result<Vec<Hash>, ProofError> {
        let size = self.size();
        let m = usize::try_from(index).unwrap_or(usize::MAX);
        if m >= size {
            return Err(ProofError::IndexOutOfRange {
                index,
                size: size as u64,
            });
        }
        // PATH(m, D[start..end]), from the leaf up.
        let mut path = Vec::new();
        let (mut start, mut end) = (0, size);
        let mut siblings = Vec::new();
        while end - start > 1 {
            let k = split(end - start);
            if m < start + k {
                siblings.push((start + k, end));
                end = start + k;
            } else {
                siblings.push((start, start + k));
                start += k;
            }
        }
        for (a, b) in siblings.into_iter().rev() {
            path.push(self.subtree(a, b));
        }
        Ok(path)
    }

    /// The consistency proof (RFC 6962 2.1.2) that this tree contains its first `first_size`
    /// leaves' tree.
    pub fn consistency_proof(&self, first_size: u64) -> Result<Vec<Hash>, ProofError> {
        let n = self.size();
        let m = usize::try_from(first_size).unwrap_or(usize::MAX);
        if m == 0 || m > n {
            return Err(ProofError::BadSizes {
                first: first_size,
                second: n as u64,
            });
        }
        // SUBPROOF(m, D[start..end], complete), collected top-down and returned bottom-up.
        let mut proof = Vec::new();
        let (mut start, mut end, mut m, mut complete) = (0, n, m, true);
        loop {
            if m == end - start {
                if !complete {
                    proof.push(self.subtree(start, end));
                }
                break;
            }
            let k = split(end - start);
            if m <= k {
                proof.push(self.subtree(start + k, end));
                end = start + k;
            } else {
                proof.push(self.subtree(start, start + k));
                start += k;
                m -= k;
                complete = false;
            }
        }
        proof.reverse();
        Ok(proof)
    }
}

/// The Merkle tree hash (RFC 6962, 2.1) over leaf hashes; the empty tree's is SHA-256("").
pub fn root(leaves: &[Hash]) -> Hash {
    MerkleTree::new(leaves).root()
}

/// Why a proof cannot be made or does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    /// The index is not in the tree.
    #[error("index {index} is not in a tree of {size} records")]
    IndexOutOfRange {
        /// The index.
        index: u64,
        /// The tree's size.
        size: u64,
    },
    /// The sizes cannot be compared.
    #[error("no consistency proof from a tree of {first} records to one of {second}")]
    BadSizes {
        /// The older size.
        first: u64,
        /// The newer size.
        second: u64,
    },
    /// The proof has the wrong number of hashes.
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    /// The proof leads to another root.
    #[error("the proof does not lead to the tree head's root")]
    RootMismatch,
}

/// The inclusion proof (audit path, RFC 6962 2.1.1) of leaf `index` in the tree of `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, ProofError> {
    MerkleTree::new(leaves).inclusion_proof(index)
}

/// The consistency proof (RFC 6962 2.1.2) that the tree of `leaves` contains the tree of its
/// first `first_size` leaves.
pub fn consistency_proof(leaves: &[Hash], first_size: u64) -> Result<Vec<Hash>, ProofError> {
    MerkleTree::new(leaves).consistency_proof(first_size)
}

/// Verifies that `leaf` is at `index` in the tree of `tree_size` with `root` (RFC 9162
/// 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange {
            index,
            size: tree_size,
        });
    }
    let (mut f_n, mut s_n) = (index, tree_size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    if r == *root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verifies that the tree of `second_size` with `second_root` contains the tree of
/// `first_size` with `first_root` (RFC 9162 2.1.4.2).
pub fn verify_consistency(
    first_size: u64,
    second_size: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first_size == 0 || first_size > second_size {
        return Err(ProofError::BadSizes {
            first: first_size,
            second: second_size,
        });
    }
    if first_size == second_size {
        return if !proof.is_empty() {
            Err(ProofError::WrongLength)
        } else if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if first_size.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::WrongLength);
    };
    let (mut f_n, mut s_n) = (first_size - 1, second_size - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    if f_r == *first_root && s_r == *second_root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

// ---- Records

/// What a record says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Accepted for delivery to the recipient.
    Accepted,
    /// Refused for the recipient, with why.
    Rejected,
    /// Put into the recipient's active mailbox.
    Placed,
    /// First opened by the recipient's side.
    Retrieved,
    /// Deemed delivered by the legal rule of its document type.
    DeemedDelivered,
    /// Not delivered: no active mailbox, or expired unopened.
    NotDelivered,
}

impl Event {
    /// The name records carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Accepted => "accepted",
            Event::Rejected => "rejected",
            Event::Placed => "placed",
            Event::Retrieved => "retrieved",
            Event::DeemedDelivered => "deemed_delivered",
            Event::NotDelivered => "not_delivered",
        }
    }

    /// The event of a name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "accepted" => Event::Accepted,
            "rejected" => Event::Rejected,
            "placed" => Event::Placed,
            "retrieved" => Event::Retrieved,
            "deemed_delivered" => Event::DeemedDelivered,
            "not_delivered" => Event::NotDelivered,
            _ => return None,
        })
    }
}

/// An attachment as records name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentDigest {
    /// The file's name.
    pub name: String,
    /// The content's SHA-256, lower-case hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// One evidence record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The format's version, 1.
    pub version: u32,
    /// Its position in the log, from 0.
    pub log_index: u64,
    /// What happened.
    pub event: Event,
    /// The message, `messages/<id>`.
    pub message: String,
    /// The recipient's address.
    pub recipient: String,
    /// The sender's address.
    pub sender: String,
    /// The message's document type.
    pub document_type: String,
    /// The digest of the message's content: SHA-256 over subject, a zero byte and body.
    pub content_sha256: String,
    /// The message's attachments.
    pub attachments: Vec<AttachmentDigest>,
    /// When it happened, Unix milliseconds (UTC).
    pub time_ms: i64,
    /// The same time in RFC 3339 (UTC, milliseconds, `Z`).
    pub time: String,
    /// Why, for events that have a reason; empty otherwise.
    pub reason: String,
}

/// JSON in the canonical form of RFC 8785 for what records hold (strings, integers, arrays,
/// objects): keys sorted, no white space, minimal string escapes.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(key, out);
                out.push(':');
                canonical(&map[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        Value::String(text) => string(text, out),
        other => out.push_str(&other.to_string()),
    }
}

fn string(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn encode_canonical(value: &impl Serialize) -> Vec<u8> {
    let mut out = String::new();
    // Records and tree heads are plain data: serialising them cannot fail.
    canonical(
        &serde_json::to_value(value).unwrap_or(Value::Null),
        &mut out,
    );
    out.into_bytes()
}

fn decode_canonical<T: Serialize + for<'a> Deserialize<'a>>(
    bytes: &[u8],
    what: &str,
) -> Result<T, String> {
    let value: T = serde_json::from_slice(bytes).map_err(|e| format!("not a {what}: {e}"))?;
    if encode_canonical(&value) != bytes {
        return Err(format!("the {what} is not in its canonical encoding"));
    }
    Ok(value)
}

impl Record {
    /// The canonical bytes: what is hashed into the log and signed.
    pub fn encode(&self) -> Vec<u8> {
        encode_canonical(self)
    }

    /// A record from its bytes, which must be its canonical encoding, version 1.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let record: Record = decode_canonical(bytes, "record")?;
        if record.version != 1 {
            return Err(format!("record version {} is not 1", record.version));
        }
        Ok(record)
    }
}

/// RFC 3339 in UTC with milliseconds: `2026-11-24T10:15:30.123Z`.
pub fn rfc3339_millis(time_ms: i64) -> String {
    let (days, ms) = (
        time_ms.div_euclid(86_400_000),
        time_ms.rem_euclid(86_400_000),
    );
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

// ---- Tree heads

/// The head of the log at some size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    /// Records in the tree.
    pub tree_size: u64,
    /// Its root hash.
    pub root_hash: Hash,
    /// When it was signed, Unix milliseconds.
    pub time_ms: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeHeadJson {
    root_hash: String,
    time_ms: i64,
    tree_size: u64,
    #[serde(rename = "type")]
    kind: String,
    version: u32,
}

const TREE_HEAD_TYPE: &str = "onestop-evidence-tree-head";

impl TreeHead {
    /// The canonical bytes that are signed.
    pub fn encode(&self) -> Vec<u8> {
        encode_canonical(&TreeHeadJson {
            root_hash: hex::encode(self.root_hash),
            time_ms: self.time_ms,
            tree_size: self.tree_size,
            kind: TREE_HEAD_TYPE.to_owned(),
            version: 1,
        })
    }

    /// A tree head from its canonical bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let json: TreeHeadJson = decode_canonical(bytes, "tree head")?;
        if json.kind != TREE_HEAD_TYPE || json.version != 1 {
            return Err("not a version 1 onestop tree head".into());
        }
        let mut root_hash = [0u8; 32];
        hex::decode_to_slice(&json.root_hash, &mut root_hash)
            .map_err(|e| format!("root_hash: {e}"))?;
        Ok(Self {
            tree_size: json.tree_size,
            root_hash,
            time_ms: json.time_ms,
        })
    }
}

// ---- Keys

/// A key evidence is signed with (Ed25519).
pub struct EvidenceKey {
    kid: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for EvidenceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A public key as published and as bundles carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// The key's id.
    pub key_id: String,
    /// `Ed25519`.
    pub algorithm: String,
    /// The raw 32-byte public key, standard base64.
    pub public_key: String,
}

impl PublicKey {
    /// Whether `signature` is this key's over `bytes`.
    pub fn verify(&self, bytes: &[u8], signature: &[u8]) -> bool {
        if self.algorithm != "Ed25519" {
            return false;
        }
        let Ok(public) = STANDARD.decode(&self.public_key) else {
            return false;
        };
        signature::UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(bytes, signature)
            .is_ok()
    }

    /// The lower-case hex SHA-256 of the raw public key, to compare with a published value.
    pub fn fingerprint(&self) -> String {
        hex::encode(sha256(
            &STANDARD.decode(&self.public_key).unwrap_or_default(),
        ))
    }
}

impl EvidenceKey {
    /// A new key, and its PKCS#8 document to keep.
    pub fn generate(kid: &str) -> Result<(Self, Vec<u8>), String> {
        let rng = ring::rand::SystemRandom::new();
        let document = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
        let key = Self::from_pkcs8(kid, document.as_ref())?;
        Ok((key, document.as_ref().to_vec()))
    }

    /// A key from a PKCS#8 document (v1, as OpenSSL writes it, or v2).
    pub fn from_pkcs8(kid: &str, der: &[u8]) -> Result<Self, String> {
        if kid.is_empty()
            || kid.len() > 64
            || !kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("key id `{kid}`: 1-64 letters, digits, `-` or `_`"));
        }
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not a PKCS#8 Ed25519 key: {e}"))?;
        Ok(Self {
            kid: kid.to_owned(),
            pair,
        })
    }

    /// Its id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `bytes`.
    pub fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        self.pair.sign(bytes).as_ref().to_vec()
    }

    /// Its public part.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key_id: self.kid.clone(),
            algorithm: "Ed25519".to_owned(),
            public_key: STANDARD.encode(self.pair.public_key().as_ref()),
        }
    }
}

// ---- Bundles

/// The format name of bundles.
pub const BUNDLE_FORMAT: &str = "onestop-evidence-bundle/1";

/// A message's evidence, verifiable offline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// [`BUNDLE_FORMAT`].
    pub format: String,
    /// The message, `messages/<id>`.
    pub message: String,
    /// Its records, in log order.
    pub entries: Vec<Entry>,
    /// The signed tree head the proofs lead to.
    pub tree_head: SignedTreeHead,
    /// The keys that signed something in the bundle.
    pub keys: Vec<PublicKey>,
}

/// One record of a bundle.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The record's bytes, standard base64.
    pub record: String,
    /// The key that signed it.
    pub key_id: String,
    /// The signature, standard base64.
    pub signature: String,
    /// Its inclusion proof in the tree head, lower-case hex hashes.
    pub inclusion_proof: Vec<String>,
}

/// A tree head with its signature.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTreeHead {
    /// The tree head's bytes, standard base64.
    pub head: String,
    /// The key that signed it.
    pub key_id: String,
    /// The signature, standard base64.
    pub signature: String,
}

/// What a verified bundle says.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The tree head's size.
    pub tree_size: u64,
    /// Its root.
    pub root_hash: Hash,
    /// The records, in log order.
    pub records: Vec<Record>,
    /// Whether the keys were the bundle's own (no trusted keys were given).
    pub keys_from_bundle: bool,
}

/// The first thing about a bundle that fails.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a bundle of this format.
    #[error("not an evidence bundle of format {BUNDLE_FORMAT}: {0}")]
    Format(String),
    /// A key is not trusted or not usable.
    #[error("key {key_id}: {why}")]
    Key {
        /// The key.
        key_id: String,
        /// Why.
        why: String,
    },
    /// The tree head fails.
    #[error("tree head: {0}")]
    TreeHead(String),
    /// A record fails.
    #[error("entry {entry} (log index {log_index}): {why}")]
    Entry {
        /// Its position in the bundle.
        entry: usize,
        /// Its log index, as far as it could be read.
        log_index: String,
        /// Why.
        why: String,
    },
    /// An attachment is not the one the records name.
    #[error(
        "attachment {name}: SHA-256 {sha256} is not the digest of any attachment the records name"
    )]
    Attachment {
        /// The file.
        name: String,
        /// Its digest.
        sha256: String,
    },
}

impl VerifyError {
    /// The failing entry's position in the bundle, if one entry failed.
    pub fn entry(&self) -> Option<usize> {
        match self {
            VerifyError::Entry { entry, .. } => Some(*entry),
            _ => None,
        }
    }
}

/// Verifies a bundle: its tree head's signature by a known key; then each entry in order — a
/// canonical record of the bundle's message, in log order inside the tree, signed by a known
/// key, its time consistent, included in the tree head; then that each given attachment is one
/// the records name. With `trusted_keys`, every key used must be one of them.
pub fn verify_bundle(
    bundle: &Bundle,
    trusted_keys: Option<&[PublicKey]>,
    attachments: &[(String, Hash)],
) -> Result<Verified, VerifyError> {
    if bundle.format != BUNDLE_FORMAT {
        return Err(VerifyError::Format(format!(
            "format is `{}`",
            bundle.format
        )));
    }
    let keys: &[PublicKey] = trusted_keys.unwrap_or(&bundle.keys);
    let key = |key_id: &str| -> Result<&PublicKey, String> {
        keys.iter()
            .find(|k| k.key_id == key_id)
            .ok_or_else(|| match trusted_keys {
                Some(_) => format!("key {key_id} is not among the trusted keys"),
                None => format!("key {key_id} is not in the bundle"),
            })
    };
    let decode = |text: &str| STANDARD.decode(text);

    let head_bytes = decode(&bundle.tree_head.head)
        .map_err(|e| VerifyError::TreeHead(format!("not base64: {e}")))?;
    let head = TreeHead::decode(&head_bytes).map_err(VerifyError::TreeHead)?;
    let head_key = key(&bundle.tree_head.key_id).map_err(VerifyError::TreeHead)?;
    let head_signature = decode(&bundle.tree_head.signature)
        .map_err(|e| VerifyError::TreeHead(format!("signature not base64: {e}")))?;
    if !head_key.verify(&head_bytes, &head_signature) {
        return Err(VerifyError::TreeHead(format!(
            "the signature does not verify with key {}",
            head_key.key_id
        )));
    }

    let mut records = Vec::with_capacity(bundle.entries.len());
    let mut last: Option<u64> = None;
    for (i, entry) in bundle.entries.iter().enumerate() {
        let fail = |log_index: String, why: String| VerifyError::Entry {
            entry: i,
            log_index,
            why,
        };
        let bytes = decode(&entry.record)
            .map_err(|e| fail("?".into(), format!("record not base64: {e}")))?;
        let record = Record::decode(&bytes).map_err(|e| fail("?".into(), e))?;
        let at = record.log_index.to_string();
        if record.message != bundle.message {
            return Err(fail(
                at,
                format!("a record of {}, not of {}", record.message, bundle.message),
            ));
        }
        if last.is_some_and(|l| record.log_index <= l) {
            return Err(fail(at, "records out of log order".into()));
        }
        last = Some(record.log_index);
        if record.log_index >= head.tree_size {
            return Err(fail(
                at,
                format!("outside the tree head of {} records", head.tree_size),
            ));
        }
        let signer = key(&entry.key_id).map_err(|e| fail(at.clone(), e))?;
        let signature = decode(&entry.signature)
            .map_err(|e| fail(at.clone(), format!("signature not base64: {e}")))?;
        if !signer.verify(&bytes, &signature) {
            return Err(fail(
                at,
                format!("the signature does not verify with key {}", signer.key_id),
            ));
        }
        if rfc3339_millis(record.time_ms) != record.time {
            return Err(fail(at, "time and time_ms disagree".into()));
        }
        let proof = entry
            .inclusion_proof
            .iter()
            .map(|h| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(h, &mut hash).map(|()| hash)
            })
            .collect::<Result<Vec<Hash>, _>>()
            .map_err(|e| fail(at.clone(), format!("inclusion proof: {e}")))?;
        verify_inclusion(
            &leaf_hash(&bytes),
            record.log_index,
            head.tree_size,
            &proof,
            &head.root_hash,
        )
        .map_err(|e| fail(at, format!("not in the signed tree: {e}")))?;
        records.push(record);
    }

    for (name, digest) in attachments {
        let hex_digest = hex::encode(digest);
        let named = records
            .iter()
            .any(|r| r.attachments.iter().any(|a| a.sha256 == hex_digest));
        if !named {
            return Err(VerifyError::Attachment {
                name: name.clone(),
                sha256: hex_digest,
            });
        }
    }
    Ok(Verified {
        tree_size: head.tree_size,
        root_hash: head.root_hash,
        records,
        keys_from_bundle: trusted_keys.is_none(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("record {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn the_certificate_transparency_vectors_hold() {
        // RFC 6962's reference inputs, as Certificate Transparency's test suites use them.
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let hashes: Vec<Hash> = inputs.iter().map(|i| leaf_hash(i)).collect();
        assert_eq!(
            hex::encode(root(&hashes)),
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
        );
        assert_eq!(
            hex::encode(root(&hashes[..1])),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// RFC 6962's definitions, written out naively, to check the kept-levels tree against.
    fn naive_root(l: &[Hash]) -> Hash {
        match l.len() {
            0 => sha256(b""),
            1 => l[0],
            n => {
                let k = split(n);
                node_hash(&naive_root(&l[..k]), &naive_root(&l[k..]))
            }
        }
    }

    fn naive_path(m: usize, l: &[Hash]) -> Vec<Hash> {
        if l.len() <= 1 {
            return Vec::new();
        }
        let k = split(l.len());
        let mut p = if m < k {
            naive_path(m, &l[..k])
        } else {
            naive_path(m - k, &l[k..])
        };
        p.push(if m < k {
            naive_root(&l[k..])
        } else {
            naive_root(&l[..k])
        });
        p
    }

    fn naive_subproof(m: usize, l: &[Hash], complete: bool) -> Vec<Hash> {
        let n = l.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![naive_root(l)]
            };
        }
        let k = split(n);
        let (mut p, other) = if m <= k {
            (naive_subproof(m, &l[..k], complete), naive_root(&l[k..]))
        } else {
            (naive_subproof(m - k, &l[k..], false), naive_root(&l[..k]))
        };
        p.push(other);
        p
    }

    #[test]
    fn the_kept_levels_agree_with_the_definitions() {
        for n in 0..=70usize {
            let l = leaves(n);
            let tree = MerkleTree::new(&l);
            assert_eq!(tree.root(), naive_root(&l), "root of {n}");
            for i in 0..n {
                assert_eq!(
                    tree.inclusion_proof(i as u64).unwrap(),
                    naive_path(i, &l),
                    "path {i} of {n}"
                );
            }
            for m in 1..=n {
                assert_eq!(
                    tree.consistency_proof(m as u64).unwrap(),
                    naive_subproof(m, &l, true),
                    "consistency {m} of {n}"
                );
            }
        }
    }

    #[test]
    fn proofs_verify_and_any_change_fails() {
        for n in 1..=24usize {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let proof = inclusion_proof(&l, i as u64).unwrap();
                verify_inclusion(&l[i], i as u64, n as u64, &proof, &r).unwrap();
                assert!(
                    verify_inclusion(&l[i], ((i + 1) % n) as u64, n as u64, &proof, &r).is_err()
                        || n == 1
                );
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j][0] ^= 1;
                    assert!(verify_inclusion(&l[i], i as u64, n as u64, &bad, &r).is_err());
                }
            }
            for m in 1..=n {
                let proof = consistency_proof(&l, m as u64).unwrap();
                let old = root(&l[..m]);
                verify_consistency(m as u64, n as u64, &old, &r, &proof).unwrap();
                let mut wrong = old;
                wrong[5] ^= 1;
                assert!(verify_consistency(m as u64, n as u64, &wrong, &r, &proof).is_err());
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j][0] ^= 1;
                    assert!(verify_consistency(m as u64, n as u64, &old, &r, &bad).is_err());
                }
            }
        }
    }

    fn record(index: u64, message: &str, event: Event) -> Record {
        Record {
            version: 1,
            log_index: index,
            event,
            message: message.into(),
            recipient: "lv:121282-11236".into(),
            sender: "member:GOV/VSAA/pensions".into(),
            document_type: "decision".into(),
            content_sha256: hex::encode(sha256(b"subject\0body")),
            attachments: vec![AttachmentDigest {
                name: "lēmums.pdf".into(),
                sha256: hex::encode(sha256(b"pdf")),
                size: 3,
            }],
            time_ms: 1_795_500_000_123,
            time: rfc3339_millis(1_795_500_000_123),
            reason: String::new(),
        }
    }

    #[test]
    fn records_have_one_encoding() {
        let r = record(7, "messages/m1", Event::Placed);
        let bytes = r.encode();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            format!(
                "{{\"attachments\":[{{\"name\":\"lēmums.pdf\",\"sha256\":\"{}\",\"size\":3}}],\
                 \"content_sha256\":\"{}\",\"document_type\":\"decision\",\"event\":\"placed\",\
                 \"log_index\":7,\"message\":\"messages/m1\",\"reason\":\"\",\
                 \"recipient\":\"lv:121282-11236\",\"sender\":\"member:GOV/VSAA/pensions\",\
                 \"time\":\"2026-11-24T06:00:00.123Z\",\"time_ms\":1795500000123,\"version\":1}}",
                hex::encode(sha256(b"pdf")),
                hex::encode(sha256(b"subject\0body"))
            )
        );
        assert_eq!(Record::decode(&bytes).unwrap(), r);
        let spaced = String::from_utf8(bytes).unwrap().replacen(',', ", ", 1);
        assert!(Record::decode(spaced.as_bytes()).is_err());
        let mut quoted = record(1, "messages/m1", Event::Accepted);
        quoted.reason = "a \"b\"\n\u{1}".into();
        let text = String::from_utf8(quoted.encode()).unwrap();
        assert!(text.contains(r#""reason":"a \"b\"\n\u0001""#), "{text}");
        assert_eq!(Record::decode(text.as_bytes()).unwrap(), quoted);
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn bundle_of(log: &[Record], key: &EvidenceKey, message: &str) -> Bundle {
        let bytes: Vec<Vec<u8>> = log.iter().map(Record::encode).collect();
        let hashes: Vec<Hash> = bytes.iter().map(|b| leaf_hash(b)).collect();
        let head = TreeHead {
            tree_size: log.len() as u64,
            root_hash: root(&hashes),
            time_ms: 1,
        }
        .encode();
        Bundle {
            format: BUNDLE_FORMAT.into(),
            message: message.into(),
            entries: log
                .iter()
                .zip(&bytes)
                .filter(|(r, _)| r.message == message)
                .map(|(r, b)| Entry {
                    record: STANDARD.encode(b),
                    key_id: key.kid().into(),
                    signature: STANDARD.encode(key.sign(b)),
                    inclusion_proof: inclusion_proof(&hashes, r.log_index)
                        .unwrap()
                        .iter()
                        .map(hex::encode)
                        .collect(),
                })
                .collect(),
            tree_head: SignedTreeHead {
                signature: STANDARD.encode(key.sign(&head)),
                head: STANDARD.encode(head),
                key_id: key.kid().into(),
            },
            keys: vec![key.public()],
        }
    }

    #[test]
    fn bundles_verify_and_tampering_is_found_where_it_is() {
        let (key, _) = EvidenceKey::generate("e1").unwrap();
        let log: Vec<Record> = [
            ("messages/a", Event::Accepted),
            ("messages/b", Event::Accepted),
            ("messages/a", Event::Placed),
            ("messages/b", Event::Placed),
            ("messages/a", Event::Retrieved),
        ]
        .iter()
        .enumerate()
        .map(|(i, (m, e))| record(i as u64, m, *e))
        .collect();
        let bundle = bundle_of(&log, &key, "messages/a");
        let keys = [key.public()];
        let pdf = [("lēmums.pdf".to_owned(), sha256(b"pdf"))];
        let ok = verify_bundle(&bundle, Some(&keys), &pdf).unwrap();
        assert_eq!(ok.records.len(), 3);
        assert!(!ok.keys_from_bundle);

        // A changed record (its time), still well-formed: its signature fails at that entry.
        let mut changed = bundle.clone();
        let mut r = Record::decode(&STANDARD.decode(&changed.entries[1].record).unwrap()).unwrap();
        r.time_ms += 1000;
        r.time = rfc3339_millis(r.time_ms);
        changed.entries[1].record = STANDARD.encode(r.encode());
        assert_eq!(
            verify_bundle(&changed, Some(&keys), &[])
                .unwrap_err()
                .entry(),
            Some(1)
        );
        // Re-signed by another key: not trusted.
        let (other, _) = EvidenceKey::generate("e1").unwrap();
        let mut forged = bundle.clone();
        forged.entries[2].signature =
            STANDARD.encode(other.sign(&STANDARD.decode(&forged.entries[2].record).unwrap()));
        assert_eq!(
            verify_bundle(&forged, Some(&keys), &[])
                .unwrap_err()
                .entry(),
            Some(2)
        );
        // A tree head with another root.
        let mut head = bundle.clone();
        head.tree_head.head = STANDARD.encode(
            TreeHead {
                tree_size: 5,
                root_hash: [0; 32],
                time_ms: 1,
            }
            .encode(),
        );
        assert!(matches!(
            verify_bundle(&head, Some(&keys), &[]),
            Err(VerifyError::TreeHead(_))
        ));
        // Entries out of order.
        let mut swapped = bundle.clone();
        swapped.entries.swap(0, 1);
        assert_eq!(
            verify_bundle(&swapped, Some(&keys), &[])
                .unwrap_err()
                .entry(),
            Some(1)
        );
        // Another key when the published ones are given.
        let (stranger, _) = EvidenceKey::generate("e2").unwrap();
        let strangers = bundle_of(&log, &stranger, "messages/a");
        assert!(verify_bundle(&strangers, Some(&keys), &[]).is_err());
        assert!(
            verify_bundle(&strangers, None, &[])
                .unwrap()
                .keys_from_bundle
        );
        // A file that is not the attachment.
        let wrong = [("lēmums.pdf".to_owned(), sha256(b"pdf!"))];
        assert!(matches!(
            verify_bundle(&bundle, Some(&keys), &wrong),
            Err(VerifyError::Attachment { .. })
        ));
    }
}
