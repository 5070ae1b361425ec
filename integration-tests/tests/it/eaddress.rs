//! The e-address through the gateway, on SQLite and PostgreSQL: an institution sends a message
//! with an attachment, the resident reads it, every evidence event is in the log in order and
//! the bundle verifies offline, and tampering is found at the record it touched; deemed
//! delivery counts working days and happens once across restarts and replicas; notices reach a
//! real SMTP server, late but whole when it refuses; a routing decision reaches the applicant's
//! mailbox once; bad input is refused and stores nothing.

use std::future::Future;
use std::time::Duration;

use onestop_eaddress::calendar::{Calendar, DeliveryRule};
use onestop_eaddress::evidence::{self, Bundle, Event, PublicKey};
use onestop_eaddress::service::{Eaddress, Outgoing, Parts, Rules, Signer, Who};
use onestop_integration_tests::smtp::SmtpServer;
use onestop_integration_tests::{Backend, TestDatabase, TestFederation, oidc};
use onestop_platform::config::DatabaseConfig;
use onestop_platform::identity::Member;
use onestop_platform::requests::{Fingerprint, Requests};
use onestop_proto::eaddress::v1::evidence_service_client::EvidenceServiceClient;
use onestop_proto::eaddress::v1::mailbox_service_client::MailboxServiceClient;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use onestop_proto::eaddress::v1::*;
use onestop_proto::identity::v1::LevelOfAssurance;
use sqlx::Row;
use time::macros::datetime;
use tonic::Code;
use tonic::transport::Channel;

use crate::identity::{CENTRE, INSTITUTION, World, bearer, login, tokens, world, world_with};
use crate::{on_both_backends, reason, violations};

on_both_backends!(
    messages_reach_mailboxes_with_verifiable_evidence,
    bad_input_is_refused_and_stores_nothing,
    deemed_delivery_counts_working_days_once,
    evidence_waits_for_a_key_and_is_never_skipped,
    institutions_receive_their_messages_on_a_stream,
    notices_reach_smtp_and_survive_refusals,
    decisions_reach_the_applicants_mailbox_once,
    control_characters_and_foreign_identifiers_are_refused_at_their_field,
);

const RESIDENT: &str = "lv:121282-11236";
const RESIDENT_2: &str = "lv:050390-12344";
/// A valid personal code whose owner never activated a mailbox.
const INACTIVE: &str = "lv:010190-12349";
const PENSIONS: &str = "member:GOV/VSAA/pensions";

fn messages(fed: &TestFederation, system: &str) -> MessageServiceClient<Channel> {
    MessageServiceClient::new(fed.gateway_client(system))
}

fn mailboxes(fed: &TestFederation, system: &str) -> MailboxServiceClient<Channel> {
    MailboxServiceClient::new(fed.gateway_client(system))
}

fn evidence_client(fed: &TestFederation, system: &str) -> EvidenceServiceClient<Channel> {
    EvidenceServiceClient::new(fed.gateway_client(system))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(evidence::sha256(bytes))
}

/// The parts of an upload: header, then chunks of `chunk` bytes.
fn upload_parts(
    content: &[u8],
    size: u64,
    sha256: &str,
    chunk: usize,
) -> Vec<UploadAttachmentRequest> {
    let mut parts = vec![UploadAttachmentRequest {
        part: Some(upload_attachment_request::Part::Header(UploadHeader {
            size,
            sha256: sha256.to_owned(),
        })),
    }];
    parts.extend(content.chunks(chunk).map(|c| UploadAttachmentRequest {
        part: Some(upload_attachment_request::Part::Chunk(c.to_vec())),
    }));
    parts
}

async fn upload(
    client: &mut MessageServiceClient<Channel>,
    content: &[u8],
) -> Result<UploadAttachmentResponse, tonic::Status> {
    let parts = upload_parts(
        content,
        content.len() as u64,
        &sha256_hex(content),
        64 * 1024,
    );
    client
        .upload_attachment(tokio_stream::iter(parts))
        .await
        .map(|r| r.into_inner())
}

fn letter(request_id: &str, recipients: &[&str]) -> SendMessageRequest {
    SendMessageRequest {
        request_id: request_id.into(),
        sender: String::new(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        subject: "Lēmums par pensijas piešķiršanu".into(),
        body: "Jums piešķirta vecuma pensija.".into(),
        document_type: "decision".into(),
        thread_id: String::new(),
        attachments: Vec::new(),
        hidden_from_delegates: false,
    }
}

/// Repeats `attempt` until it gives a value, pausing briefly between tries (through the
/// gateway, so as not to spend the member's rate), for at most 30 s.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tick.tick().await;
            if let Some(value) = attempt().await {
                return value;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 30 s"))
}

/// A resident's token through the demo centre's desk.
async fn resident_token(fed: &TestFederation, account: &str) -> String {
    let response = login(
        fed,
        CENTRE,
        "residents",
        account,
        oidc::ACR_HIGH,
        LevelOfAssurance::Unspecified,
    )
    .await
    .unwrap();
    tokens(&response).access_token.clone()
}

async fn activate(fed: &TestFederation, token: &str, email: &str) {
    let mailbox = mailboxes(fed, CENTRE)
        .activate_mailbox(bearer(
            ActivateMailboxRequest {
                notice_email: email.into(),
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .mailbox
        .unwrap();
    assert!(mailbox.active);
}

/// The message as the resident reads it, once it is in their mailbox.
async fn placed(fed: &TestFederation, token: &str, name: &str) -> Message {
    eventually("the message is placed", || async {
        let page = messages(fed, CENTRE)
            .list_messages(bearer(ListMessagesRequest::default(), token))
            .await
            .ok()?
            .into_inner();
        page.messages.into_iter().find(|m| m.name == name)
    })
    .await
}

/// The message's bundle once `records` of its records are signed and none waits.
async fn bundle_with(fed: &TestFederation, system: &str, name: &str, records: usize) -> Bundle {
    eventually("the evidence is signed", || async {
        let answer = evidence_client(fed, system)
            .get_evidence_bundle(GetEvidenceBundleRequest {
                name: name.into(),
                recipient: String::new(),
            })
            .await
            .ok()?
            .into_inner();
        let bundle: Bundle = serde_json::from_str(&answer.bundle_json).unwrap();
        (answer.pending_records == 0 && bundle.entries.len() == records).then_some(bundle)
    })
    .await
}

async fn published_keys(fed: &TestFederation) -> Vec<PublicKey> {
    use base64::Engine;
    evidence_client(fed, INSTITUTION)
        .list_evidence_keys(ListEvidenceKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| PublicKey {
            key_id: k.key_id,
            algorithm: k.algorithm,
            public_key: base64::engine::general_purpose::STANDARD.encode(k.public_key),
        })
        .collect()
}

fn events_of(records: &[evidence::Record], recipient: &str) -> Vec<Event> {
    records
        .iter()
        .filter(|r| r.recipient == recipient)
        .map(|r| r.event)
        .collect()
}

async fn pool(fed: &TestFederation) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&fed.databases["eaddress"])
        .await
        .unwrap()
}

async fn count(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn messages_reach_mailboxes_with_verifiable_evidence(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let token = resident_token(&fed, oidc::LV_RESIDENT).await;
    activate(&fed, &token, "").await;

    // Who has an e-address: the resident now, the company and the institution by law.
    let looked = mailboxes(&fed, INSTITUTION)
        .lookup_mailboxes(LookupMailboxesRequest {
            addresses: vec![
                RESIDENT.into(),
                "lv:01019012349".into(),
                "company:40003012345".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .mailboxes;
    let states: Vec<(&str, bool)> = looked
        .iter()
        .map(|m| (m.address.as_str(), m.active))
        .collect();
    assert_eq!(
        states,
        [
            (RESIDENT, true),
            (INACTIVE, false),
            ("company:40003012345", true)
        ]
    );

    // The institution uploads a document and sends it to the resident and to someone without
    // an active mailbox.
    let mut institution = messages(&fed, INSTITUTION);
    let document: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let uploaded = upload(&mut institution, &document).await.unwrap();
    assert_eq!(uploaded.sha256, sha256_hex(&document));
    let mut send = letter("letter-1", &[RESIDENT, INACTIVE]);
    send.attachments.push(AttachmentRef {
        sha256: uploaded.sha256.clone(),
        file_name: "lemums.pdf".into(),
        media_type: "application/pdf".into(),
    });
    let sent = institution
        .send_message(send.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.recipient_count, 2);
    // A retry answers the same message.
    let again = institution.send_message(send).await.unwrap().into_inner();
    assert_eq!(again.name, sent.name);

    // The resident finds it, reads it (first opening) and downloads the document.
    let listed = placed(&fed, &token, &sent.name).await;
    assert_eq!(listed.state, DeliveryState::Placed as i32);
    assert!(listed.body.is_empty(), "listings leave bodies out");
    let mut desk = messages(&fed, CENTRE);
    let read = desk
        .get_message(bearer(
            GetMessageRequest {
                name: sent.name.clone(),
                mailbox: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(read.state, DeliveryState::Retrieved as i32);
    assert_eq!(read.body, "Jums piešķirta vecuma pensija.");
    assert_eq!(read.sender, PENSIONS);
    let mut chunks = desk
        .download_attachment(bearer(
            DownloadAttachmentRequest {
                name: sent.name.clone(),
                mailbox: String::new(),
                sha256: uploaded.sha256.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut downloaded = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        downloaded.extend(chunk.chunk);
    }
    assert_eq!(downloaded, document);

    // Evidence: accepted, placed, retrieved for the resident; accepted, not delivered for the
    // other; the bundle verifies offline against the published keys.
    let keys = published_keys(&fed).await;
    let bundle = bundle_with(&fed, INSTITUTION, &sent.name, 5).await;
    let attachment = [("lemums.pdf".to_owned(), evidence::sha256(&document))];
    let verified = evidence::verify_bundle(&bundle, Some(&keys), &attachment).unwrap();
    assert_eq!(
        events_of(&verified.records, RESIDENT),
        [Event::Accepted, Event::Placed, Event::Retrieved]
    );
    assert_eq!(
        events_of(&verified.records, INACTIVE),
        [Event::Accepted, Event::NotDelivered]
    );
    let not_delivered = verified
        .records
        .iter()
        .find(|r| r.event == Event::NotDelivered)
        .unwrap();
    assert_eq!(not_delivered.reason, "no_active_mailbox");
    assert!(
        verified
            .records
            .iter()
            .all(|r| r.attachments[0].sha256 == uploaded.sha256)
    );
    // The resident's own bundle holds only their records, and verifies too.
    let own = evidence_client(&fed, CENTRE)
        .get_evidence_bundle(bearer(
            GetEvidenceBundleRequest {
                name: sent.name.clone(),
                recipient: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let own: Bundle = serde_json::from_str(&own.bundle_json).unwrap();
    let own = evidence::verify_bundle(&own, Some(&keys), &[]).unwrap();
    assert!(own.records.iter().all(|r| r.recipient == RESIDENT));

    // A changed byte of the document is found: at download and at verification.
    let head_before = verified.tree_size;
    let path = fed
        .data_dir
        .join("eaddress/attachments")
        .join(&uploaded.sha256[..2])
        .join(&uploaded.sha256[2..4])
        .join(&uploaded.sha256);
    let mut altered = std::fs::read(&path).unwrap();
    altered[1000] ^= 1;
    std::fs::write(&path, &altered).unwrap();
    let mut chunks = desk
        .download_attachment(bearer(
            DownloadAttachmentRequest {
                name: sent.name.clone(),
                mailbox: String::new(),
                sha256: uploaded.sha256.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let status = loop {
        match chunks.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("an altered attachment was served whole"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    let failure = evidence::verify_bundle(
        &bundle,
        Some(&keys),
        &[("lemums.pdf".to_owned(), evidence::sha256(&altered))],
    )
    .unwrap_err();
    assert!(failure.to_string().contains("lemums.pdf"), "{failure}");

    // A changed stored record is found at that record.
    let db = pool(&fed).await;
    let row = sqlx::query(
        "SELECT log_index, record FROM evidence_log WHERE record LIKE '%\"retrieved\"%' \
         ORDER BY log_index DESC LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let index: i64 = row.try_get("log_index").unwrap();
    let record: String = row.try_get("record").unwrap();
    let forged = record.replace("\"retrieved\"", "\"placed\"");
    sqlx::query("UPDATE evidence_log SET record = $1 WHERE log_index = $2")
        .bind(forged)
        .bind(index)
        .execute(&db)
        .await
        .unwrap();
    let tampered: Bundle = serde_json::from_str(
        &evidence_client(&fed, INSTITUTION)
            .get_evidence_bundle(GetEvidenceBundleRequest {
                name: sent.name.clone(),
                recipient: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .bundle_json,
    )
    .unwrap();
    let failure = evidence::verify_bundle(&tampered, Some(&keys), &[]).unwrap_err();
    let at = tampered
        .entries
        .iter()
        .position(|e| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&e.record)
                .unwrap();
            evidence::Record::decode(&bytes).map_or(true, |r| r.log_index == index as u64)
        })
        .unwrap();
    assert_eq!(failure.entry(), Some(at), "{failure}");

    // The log only grows: a later tree head is consistent with the earlier one.
    let second = institution
        .send_message(letter("letter-2", &[RESIDENT]))
        .await
        .unwrap()
        .into_inner();
    bundle_with(&fed, INSTITUTION, &second.name, 2).await;
    let mut log = evidence_client(&fed, INSTITUTION);
    let new = log
        .get_tree_head(GetTreeHeadRequest { tree_size: 0 })
        .await
        .unwrap()
        .into_inner()
        .tree_head
        .unwrap();
    let old = log
        .get_tree_head(GetTreeHeadRequest {
            tree_size: head_before,
        })
        .await
        .unwrap()
        .into_inner()
        .tree_head
        .unwrap();
    assert!(new.tree_size > old.tree_size);
    let proof: Vec<evidence::Hash> = log
        .get_consistency_proof(GetConsistencyProofRequest {
            first_tree_size: old.tree_size,
            second_tree_size: new.tree_size,
        })
        .await
        .unwrap()
        .into_inner()
        .proof
        .iter()
        .map(|h| h.as_slice().try_into().unwrap())
        .collect();
    let (old_root, new_root): (evidence::Hash, evidence::Hash) = (
        old.root_hash.as_slice().try_into().unwrap(),
        new.root_hash.as_slice().try_into().unwrap(),
    );
    evidence::verify_consistency(old.tree_size, new.tree_size, &old_root, &new_root, &proof)
        .unwrap();
    let mut wrong = old_root;
    wrong[0] ^= 1;
    assert!(
        evidence::verify_consistency(old.tree_size, new.tree_size, &wrong, &new_root, &proof)
            .is_err()
    );
    fed.stop().await;
}

async fn bad_input_is_refused_and_stores_nothing(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let db = pool(&fed).await;
    let mut institution = messages(&fed, INSTITUTION);
    let content = b"a document".repeat(1000);
    let digest = sha256_hex(&content);
    let uploads_left = || {
        std::fs::read_dir(fed.data_dir.join("eaddress/attachments/tmp"))
            .unwrap()
            .count()
    };

    // A hash that does not match.
    let wrong = sha256_hex(b"something else");
    let status = institution
        .upload_attachment(tokio_stream::iter(upload_parts(
            &content,
            content.len() as u64,
            &wrong,
            4096,
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "DIGEST_MISMATCH");
    // Over the limit, declared or sent.
    let status = institution
        .upload_attachment(tokio_stream::iter(upload_parts(
            &[],
            (1 << 30) + 1,
            &digest,
            1,
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = institution
        .upload_attachment(tokio_stream::iter(upload_parts(
            &content, 100, &digest, 4096,
        )))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Cut off: fewer bytes than declared, and a stream broken mid-way.
    let status = institution
        .upload_attachment(tokio_stream::iter(upload_parts(
            &content[..5000],
            content.len() as u64,
            &digest,
            4096,
        )))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "UPLOAD_CUT_OFF", "{status:?}");
    // The client dies mid-upload: its stream is reset, and the partial file goes.
    let (parts, outgoing) = tokio::sync::mpsc::channel(16);
    for part in upload_parts(&content[..8192], content.len() as u64, &digest, 4096) {
        parts.send(part).await.unwrap();
    }
    let mut dying = messages(&fed, INSTITUTION);
    let call = tokio::spawn(async move {
        dying
            .upload_attachment(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
    });
    eventually("the upload is under way", || async {
        (uploads_left() == 1).then_some(())
    })
    .await;
    call.abort();
    drop(parts);
    eventually("the cut-off upload is removed", || async {
        (uploads_left() == 0).then_some(())
    })
    .await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM blobs").await, 0);
    assert_eq!(uploads_left(), 0, "refused uploads leave no file behind");

    // A recipient in a wrong format; nothing is stored.
    let status = institution
        .send_message(letter("bad-1", &[RESIDENT, "lv:121282-11237", "x:1"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["recipients[1]", "recipients[2]"]);
    // An attachment never uploaded.
    let mut unknown = letter("bad-2", &[RESIDENT]);
    unknown.attachments.push(AttachmentRef {
        sha256: digest.clone(),
        file_name: "x.pdf".into(),
        media_type: "application/pdf".into(),
    });
    let status = institution.send_message(unknown).await.unwrap_err();
    assert_eq!(reason(&status), "ATTACHMENT_NOT_UPLOADED", "{status:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM messages").await, 0);

    // Two residents; the first names the second a delegate.
    let first = resident_token(&fed, oidc::LV_RESIDENT).await;
    let second = resident_token(&fed, oidc::LV_RESIDENT_2).await;
    activate(&fed, &first, "").await;
    activate(&fed, &second, "").await;
    mailboxes(&fed, CENTRE)
        .update_mailbox(bearer(
            UpdateMailboxRequest {
                notice_email: String::new(),
                add_delegates: vec![RESIDENT_2.into()],
                remove_delegates: Vec::new(),
            },
            &first,
        ))
        .await
        .unwrap();
    let open = institution
        .send_message(letter("open", &[RESIDENT]))
        .await
        .unwrap()
        .into_inner();
    let mut hidden = letter("hidden", &[RESIDENT]);
    hidden.hidden_from_delegates = true;
    let hidden = institution.send_message(hidden).await.unwrap().into_inner();
    placed(&fed, &first, &hidden.name).await;
    placed(&fed, &first, &open.name).await;
    let mut desk = messages(&fed, CENTRE);
    let as_delegate = |name: &str| {
        bearer(
            GetMessageRequest {
                name: name.to_owned(),
                mailbox: RESIDENT.into(),
            },
            &second,
        )
    };
    // The delegate reads the open one, not the hidden one; a delegate's list leaves it out.
    desk.get_message(as_delegate(&open.name)).await.unwrap();
    let status = desk
        .get_message(as_delegate(&hidden.name))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "HIDDEN_FROM_DELEGATES");
    let status = evidence_client(&fed, CENTRE)
        .get_evidence_bundle(bearer(
            GetEvidenceBundleRequest {
                name: hidden.name.clone(),
                recipient: RESIDENT.into(),
            },
            &second,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "HIDDEN_FROM_DELEGATES", "{status:?}");
    let listed = desk
        .list_messages(bearer(
            ListMessagesRequest {
                mailbox: RESIDENT.into(),
                ..Default::default()
            },
            &second,
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(listed.len(), 1);
    // The hidden one is still unopened: the refusal recorded nothing.
    let state: String = sqlx::query("SELECT state FROM deliveries WHERE message_id = $1")
        .bind(hidden.name.trim_start_matches("messages/"))
        .fetch_one(&db)
        .await
        .unwrap()
        .try_get("state")
        .unwrap();
    assert_eq!(state, "placed");
    // The first resident may not read the second's mailbox.
    let status = desk
        .list_messages(bearer(
            ListMessagesRequest {
                mailbox: RESIDENT_2.into(),
                ..Default::default()
            },
            &first,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_YOUR_MAILBOX");
    // Nor may another member system read the resident's mailbox.
    let status = messages(&fed, INSTITUTION)
        .list_messages(ListMessagesRequest {
            mailbox: RESIDENT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A reply in a thread the resident takes part in goes to the institution; in another
    // thread it is refused and stores nothing.
    let before = count(&db, "SELECT COUNT(*) FROM messages").await;
    let mut reply = letter("reply-1", &[]);
    reply.document_type = "reply".into();
    reply.thread_id = open.thread_id.clone();
    let stranger = institution
        .send_message(letter("to-second", &[RESIDENT_2]))
        .await
        .unwrap()
        .into_inner();
    let mut foreign = reply.clone();
    foreign.request_id = "reply-2".into();
    foreign.thread_id = stranger.thread_id.clone();
    let status = desk
        .send_message(bearer(foreign, &first))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "NOT_A_THREAD_PARTY");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM messages").await,
        before + 1
    );
    let replied = desk
        .send_message(bearer(reply, &first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replied.thread_id, open.thread_id);
    let incoming = eventually("the reply reaches the institution", || async {
        let page = messages(&fed, INSTITUTION)
            .list_messages(ListMessagesRequest::default())
            .await
            .ok()?
            .into_inner();
        page.messages.into_iter().find(|m| m.name == replied.name)
    })
    .await;
    assert_eq!(incoming.sender, RESIDENT);
    fed.stop().await;
}

/// An e-address over `url` with its files in `dir`, without a server: for background work at
/// chosen times.
async fn open_direct(url: &str, dir: &std::path::Path) -> Eaddress {
    open_direct_with(url, dir, true).await
}

async fn open_direct_with(url: &str, dir: &std::path::Path, generate_key: bool) -> Eaddress {
    let db = onestop_platform::db::open(
        &DatabaseConfig::at(url),
        &onestop_eaddress::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let requests = Requests::new(&db, Duration::from_secs(3600));
    Eaddress::new(Parts {
        store: onestop_eaddress::store::Store::new(db),
        requests,
        blobs: onestop_eaddress::blobs::Blobs::open(&dir.join("attachments"))
            .await
            .unwrap(),
        calendar: Calendar::latvia(),
        rules: Rules {
            default: DeliveryRule::parse("working-days:2").unwrap(),
            by_type: [(
                "notice".to_owned(),
                DeliveryRule::parse("opened:30").unwrap(),
            )]
            .into_iter()
            .collect(),
        },
        max_attachment_bytes: 1 << 20,
        trusted_senders: Vec::new(),
        signer: Signer::open(&dir.join("keys"), generate_key).unwrap(),
        mailer: None,
        incoming_lease: Duration::from_secs(60),
    })
    .await
    .unwrap()
}

async fn deemed_delivery_counts_working_days_once(backend: Backend) {
    let database = TestDatabase::start(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let first = open_direct(&database.url, dir.path()).await;
    let institution = Who::Member(Member::parse("GOV/VSAA/pensions").unwrap());
    let resident = Who::Person {
        address: onestop_eaddress::address::Address::parse(RESIDENT).unwrap(),
        clerk: None,
        mandate: Vec::new(),
    };
    first.activate(&resident, "").await.unwrap();
    let send = |id: &str, document_type: &str| Outgoing {
        sender: String::new(),
        recipients: vec![RESIDENT.into()],
        subject: format!("{document_type} {id}"),
        body: String::new(),
        document_type: document_type.into(),
        thread_id: String::new(),
        attachments: Vec::new(),
        hidden_from_delegates: false,
    };
    let mut sent = Vec::new();
    for (id, kind) in [
        ("easter", "decision"),
        ("weekend", "decision"),
        ("opened", "notice"),
    ] {
        let out = send(id, kind);
        sent.push(
            first
                .send(
                    &institution,
                    "GOV/VSAA/pensions",
                    id,
                    Fingerprint::of_bytes(id.as_bytes()),
                    out,
                )
                .await
                .unwrap(),
        );
    }
    // Placed on Thursday 2 April 2026 at 10:00 in Riga: Good Friday and Easter Monday are
    // public holidays and the weekend is not worked, so the second working day after is
    // Wednesday 8 April; deemed delivered from its start (00:00 Riga, 21:00 UTC the day
    // before).
    let thursday = datetime!(2026-04-02 07:00 UTC);
    assert_eq!(first.dispatch(thursday).await.unwrap(), 3);
    // Before that moment nothing is deemed; the message with the "opened" rule never is.
    assert_eq!(
        first
            .pass_deadlines(datetime!(2026-04-07 20:59 UTC))
            .await
            .unwrap(),
        0
    );
    // Two replicas (and the same one twice) at that moment: recorded once.
    let second = open_direct(&database.url, dir.path()).await;
    let deadline = datetime!(2026-04-07 21:00 UTC);
    let (a, b) = tokio::join!(
        first.pass_deadlines(deadline),
        second.pass_deadlines(deadline)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2, "both decisions, once each");
    assert_eq!(first.pass_deadlines(deadline).await.unwrap(), 0);
    // After a restart, nothing is recorded again.
    drop(first);
    drop(second);
    let restarted = open_direct(&database.url, dir.path()).await;
    assert_eq!(
        restarted
            .pass_deadlines(datetime!(2026-05-01 00:00 UTC))
            .await
            .unwrap(),
        0
    );
    // The "opened" rule's message expires after 30 days unopened.
    assert_eq!(
        restarted
            .pass_deadlines(datetime!(2026-05-02 07:00 UTC))
            .await
            .unwrap(),
        1
    );
    restarted.sign_evidence().await.unwrap();
    let records = restarted.store().records(&sent[0].id, None).await.unwrap();
    let events: Vec<String> = records
        .iter()
        .map(|r| evidence::Record::decode(r.record.as_bytes()).unwrap())
        .map(|r| format!("{} {} {}", r.event.as_str(), r.time, r.reason))
        .collect();
    assert_eq!(
        events,
        [
            format!(
                "accepted {} ",
                evidence::rfc3339_millis(onestop_platform::db::millis(sent[0].accept_time))
            ),
            "placed 2026-04-02T07:00:00.000Z ".to_owned(),
            "deemed_delivered 2026-04-07T21:00:00.000Z working-days:2".to_owned(),
        ]
    );
    let expired = restarted.store().records(&sent[2].id, None).await.unwrap();
    let last = evidence::Record::decode(expired.last().unwrap().record.as_bytes()).unwrap();
    assert_eq!(
        (last.event, last.reason.as_str()),
        (Event::NotDelivered, "expired")
    );

    // Placed on a Friday (20 November 2026): Saturday and Sunday are skipped, so deemed from
    // Tuesday 24 November 00:00 Riga.
    let out = send("friday", "decision");
    let friday = restarted
        .send(
            &institution,
            "GOV/VSAA/pensions",
            "friday",
            Fingerprint::of_bytes(b"friday"),
            out,
        )
        .await
        .unwrap();
    restarted
        .dispatch(datetime!(2026-11-20 12:00 UTC))
        .await
        .unwrap();
    assert_eq!(
        restarted
            .pass_deadlines(datetime!(2026-11-23 21:59 UTC))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        restarted
            .pass_deadlines(datetime!(2026-11-23 22:00 UTC))
            .await
            .unwrap(),
        1
    );
    let state = restarted
        .store()
        .delivery(&friday.id, RESIDENT)
        .await
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(
        state,
        onestop_eaddress::model::DeliveryState::DeemedDelivered
    );
    // Opening it afterwards still records the retrieval.
    let reader = restarted.reader(&resident, "").await.unwrap();
    restarted.read(&reader, &friday.id).await.unwrap();
    restarted.sign_evidence().await.unwrap();
    let records = restarted.store().records(&friday.id, None).await.unwrap();
    let events: Vec<Event> = records
        .iter()
        .map(|r| evidence::Record::decode(r.record.as_bytes()).unwrap().event)
        .collect();
    assert_eq!(
        events,
        [
            Event::Accepted,
            Event::Placed,
            Event::DeemedDelivered,
            Event::Retrieved
        ]
    );
}

async fn notices_reach_smtp_and_survive_refusals(backend: Backend) {
    let mut smtp = SmtpServer::start(true).await;
    let port = smtp.port();
    let World { fed, providers: _p } = world_with(backend, move |options| {
        options.admin = Some("127.0.0.1:0".parse().unwrap());
        std::fs::write(
            options.data_dir.join("eaddress.toml"),
            format!(
                "attachments_dir = \"eaddress/attachments\"\n\
                 evidence_key_dir = \"eaddress/evidence-keys\"\n\
                 generate_evidence_key = true\n\
                 notice_first_retry_ms = 200\n\
                 [smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n"
            ),
        )
        .unwrap();
    })
    .await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let token = resident_token(&fed, oidc::LV_RESIDENT).await;
    activate(&fed, &token, "janis@example.lv").await;
    let mut institution = messages(&fed, INSTITUTION);
    let secret = "Lēmums par pabalstu Nr. 42";
    let mut send = letter("noticed", &[RESIDENT]);
    send.subject = secret.into();
    let sent = institution.send_message(send).await.unwrap().into_inner();
    // The refusing server delays the notice, not the message.
    placed(&fed, &token, &sent.name).await;
    let db = pool(&fed).await;
    eventually("a notice attempt failed", || async {
        (count(&db, "SELECT COALESCE(MAX(attempts), 0) FROM notices").await >= 1).then_some(())
    })
    .await;
    assert!(smtp.try_mail().is_none());
    smtp.set_refusing(false).await;
    let mail = smtp.next_mail().await;
    assert_eq!(mail.to, ["janis@example.lv"]);
    assert!(
        !mail.body.contains(secret) && !mail.subject.contains(secret),
        "{mail:?}"
    );
    assert!(!mail.body.contains("VSAA"), "content-free: {mail:?}");
    eventually("the notice is recorded as sent", || async {
        (count(
            &db,
            "SELECT COUNT(*) FROM notices WHERE sent_time_ms IS NOT NULL",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    assert!(smtp.try_mail().is_none(), "one notice per message");

    // A server that rejects the address for good: the notice is given up at once (and
    // logged), the message is placed all the same.
    smtp.reject_all().await;
    let rejected = institution
        .send_message(letter("rejected", &[RESIDENT]))
        .await
        .unwrap()
        .into_inner();
    placed(&fed, &token, &rejected.name).await;
    eventually("the rejected notice is given up", || async {
        (count(&db, "SELECT COUNT(*) FROM notices WHERE gave_up = 1").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM notices WHERE gave_up = 1 AND attempts = 1"
        )
        .await,
        1,
        "a permanent failure is not retried"
    );
    assert!(smtp.try_mail().is_none());
    // Operators see what waits (the figures are the process's, shared with other tests here).
    let (_, metrics) = onestop_integration_tests::http_get(fed.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("onestop_eaddress_notices_unsent"),
        "{metrics}"
    );
    assert!(
        metrics.contains("onestop_eaddress_evidence_pending"),
        "{metrics}"
    );
    fed.stop().await;
}

async fn decisions_reach_the_applicants_mailbox_once(backend: Backend) {
    use onestop_proto::routing::v1 as routing;
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let token = resident_token(&fed, oidc::LV_RESIDENT).await;
    activate(&fed, &token, "").await;
    let mut data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // An application about the resident filing it.
    data["applicant"]["personal_code"] = oidc::LV_RESIDENT_PERSONAL_CODE.into();
    let data = data.to_string();
    let receipt = routing::application_service_client::ApplicationServiceClient::new(
        fed.gateway_client(CENTRE),
    )
    .submit_application(bearer(
        routing::SubmitApplicationRequest {
            request_id: "pension-1".into(),
            service_id: "vsaa-old-age-pension".into(),
            form_version: "1".into(),
            data_json: data,
            municipality_code: "gulbene".into(),
            paper_intake: None,
        },
        &token,
    ))
    .await
    .unwrap()
    .into_inner()
    .receipt
    .unwrap();
    let decision = b"%PDF-1.7 decision".to_vec();
    routing::application_service_client::ApplicationServiceClient::new(
        fed.gateway_client(INSTITUTION),
    )
    .update_application_status(routing::UpdateApplicationStatusRequest {
        request_id: "decide-1".into(),
        name: receipt.application.clone(),
        status: routing::ApplicationStatus::Decided as i32,
        note: "Piešķirta".into(),
        decision: Some(routing::Decision {
            title: "Lēmums".into(),
            media_type: "application/pdf".into(),
            content: decision.clone(),
            content_sha256: sha256_hex(&decision),
        }),
    })
    .await
    .unwrap();
    let is_decision =
        |m: &Message| m.document_type == "decision" && m.subject.contains(&receipt.application);
    let arrived = eventually("the decision reaches the mailbox", || async {
        let page = messages(&fed, CENTRE)
            .list_messages(bearer(ListMessagesRequest::default(), &token))
            .await
            .ok()?
            .into_inner();
        page.messages.into_iter().find(is_decision)
    })
    .await;
    assert_eq!(arrived.sender, "member:GOV/VSAA/pensions");
    assert_eq!(arrived.attachments[0].sha256, sha256_hex(&decision));
    assert_eq!(arrived.attachments[0].file_name, "Lēmums.pdf");
    // As if routing had died between sending and marking the notification drained: it is sent
    // again, and the e-address answers from its record.
    sqlx::any::install_default_drivers();
    let routing_db = sqlx::AnyPool::connect(&fed.databases["routing"])
        .await
        .unwrap();
    sqlx::query("UPDATE notifications SET drain_time_ms = NULL")
        .execute(&routing_db)
        .await
        .unwrap();
    eventually("the outbox is drained again", || async {
        (count(
            &routing_db,
            "SELECT COUNT(*) FROM notifications WHERE drain_time_ms IS NULL",
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
    let db = pool(&fed).await;
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM messages WHERE document_type = 'decision'"
        )
        .await,
        1
    );
    // The sender's evidence: accepted and placed, signed.
    let keys = published_keys(&fed).await;
    let bundle = bundle_with(&fed, INSTITUTION, &arrived.name, 2).await;
    let verified = evidence::verify_bundle(&bundle, Some(&keys), &[]).unwrap();
    assert_eq!(
        events_of(&verified.records, RESIDENT),
        [Event::Accepted, Event::Placed]
    );
    fed.stop().await;
}

async fn evidence_waits_for_a_key_and_is_never_skipped(backend: Backend) {
    let database = TestDatabase::start(backend).await;
    let dir = tempfile::tempdir().unwrap();
    // No signing key yet (a secret not mounted, a key being provisioned).
    let eaddress = open_direct_with(&database.url, dir.path(), false).await;
    let institution = Who::Member(Member::parse("GOV/VSAA/pensions").unwrap());
    let out = Outgoing {
        sender: String::new(),
        recipients: vec!["company:40003012345".into()],
        subject: "Paziņojums".into(),
        body: String::new(),
        document_type: "letter".into(),
        thread_id: String::new(),
        attachments: Vec::new(),
        hidden_from_delegates: false,
    };
    let sent = eaddress
        .send(
            &institution,
            "GOV/VSAA/pensions",
            "m1",
            Fingerprint::of_bytes(b"m1"),
            out,
        )
        .await
        .expect("accepted without a key");
    eaddress
        .dispatch(onestop_platform::clock::now())
        .await
        .unwrap();
    assert_eq!(eaddress.sign_evidence().await.unwrap(), 0);
    assert_eq!(
        eaddress
            .store()
            .pending_count(Some(&sent.id))
            .await
            .unwrap(),
        2
    );
    assert!(eaddress.bundle(&institution, &sent.id, "").await.is_err());
    // A key arrives: the waiting evidence is signed, in order, none skipped.
    let (_, der) = evidence::EvidenceKey::generate("e2026").unwrap();
    std::fs::write(dir.path().join("keys/e2026.p8"), der).unwrap();
    assert_eq!(eaddress.sign_evidence().await.unwrap(), 2);
    assert_eq!(eaddress.store().pending_count(None).await.unwrap(), 0);
    let (bundle, pending) = eaddress.bundle(&institution, &sent.id, "").await.unwrap();
    assert_eq!(pending, 0);
    let keys = eaddress.keys().await.unwrap();
    let verified = evidence::verify_bundle(&bundle, Some(&keys), &[]).unwrap();
    let events: Vec<Event> = verified.records.iter().map(|r| r.event).collect();
    assert_eq!(events, [Event::Accepted, Event::Placed]);
    assert!(verified.records.iter().all(|r| r.sender == PENSIONS));
}

/// An institution's open incoming stream.
struct IncomingConsumer {
    requests: tokio::sync::mpsc::Sender<StreamIncomingMessagesRequest>,
    responses: tonic::Streaming<StreamIncomingMessagesResponse>,
}

impl IncomingConsumer {
    async fn open(fed: &TestFederation, window: u32) -> Self {
        let (requests, outgoing) = tokio::sync::mpsc::channel(16);
        requests
            .send(StreamIncomingMessagesRequest {
                kind: Some(stream_incoming_messages_request::Kind::Open(OpenIncoming {
                    mailbox: String::new(),
                    max_unacknowledged: window,
                })),
            })
            .await
            .unwrap();
        let responses = messages(fed, INSTITUTION)
            .stream_incoming_messages(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    async fn next(&mut self) -> StreamIncomingMessagesResponse {
        tokio::time::timeout(Duration::from_secs(30), self.responses.message())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .expect("the stream is open")
    }

    async fn message(&mut self) -> IncomingMessage {
        match self.next().await.kind {
            Some(stream_incoming_messages_response::Kind::Message(m)) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn ack(&mut self, names: &[&str]) -> AcknowledgeResult {
        self.requests
            .send(StreamIncomingMessagesRequest {
                kind: Some(stream_incoming_messages_request::Kind::Ack(
                    AcknowledgeMessages {
                        names: names.iter().map(|n| (*n).to_owned()).collect(),
                    },
                )),
            })
            .await
            .unwrap();
        match self.next().await.kind {
            Some(stream_incoming_messages_response::Kind::AckResult(r)) => r,
            other => panic!("expected an ack result, got {other:?}"),
        }
    }
}

async fn institutions_receive_their_messages_on_a_stream(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let token = resident_token(&fed, oidc::LV_RESIDENT).await;
    activate(&fed, &token, "").await;
    let asked = messages(&fed, INSTITUTION)
        .send_message(letter("ask", &[RESIDENT]))
        .await
        .unwrap()
        .into_inner();
    placed(&fed, &token, &asked.name).await;

    // A person cannot hold a mailbox's stream.
    let (person_requests, outgoing) = tokio::sync::mpsc::channel(1);
    person_requests
        .send(StreamIncomingMessagesRequest {
            kind: Some(stream_incoming_messages_request::Kind::Open(OpenIncoming {
                mailbox: String::new(),
                max_unacknowledged: 1,
            })),
        })
        .await
        .unwrap();
    let status = messages(&fed, CENTRE)
        .stream_incoming_messages(bearer(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SYSTEMS_ONLY", "{status:?}");

    // The institution's system holds its stream; the resident answers three times.
    let mut consumer = IncomingConsumer::open(&fed, 2).await;
    let mut replies = Vec::new();
    for i in 0..3 {
        let mut reply = letter(&format!("reply-{i}"), &[]);
        reply.document_type = "reply".into();
        reply.subject = format!("Atbilde {i}");
        reply.thread_id = asked.thread_id.clone();
        let sent = messages(&fed, CENTRE)
            .send_message(bearer(reply, &token))
            .await
            .unwrap()
            .into_inner();
        replies.push(sent.name);
    }
    let first = consumer.message().await;
    let second = consumer.message().await;
    let first_name = first.message.as_ref().unwrap().name.clone();
    assert_eq!(first_name, replies[0]);
    assert_eq!(second.message.as_ref().unwrap().name, replies[1]);
    assert_eq!(first.message.as_ref().unwrap().sender, RESIDENT);
    assert_eq!(first.attempt, 1);
    // The window is full until an acknowledgement frees it; a stranger's name is refused.
    let result = consumer.ack(&[&first_name, "messages/nosuchmessage"]).await;
    assert_eq!(result.acknowledged, std::slice::from_ref(&first_name));
    assert_eq!(result.refused[0].reason, "DELIVERY_NOT_SENT");
    let third = consumer.message().await;
    assert_eq!(third.message.as_ref().unwrap().name, replies[2]);

    // The stream goes away with two unacknowledged: a new one gets them again.
    drop(consumer);
    let mut again = IncomingConsumer::open(&fed, 10).await;
    let redelivered = [again.message().await, again.message().await];
    let names: Vec<&str> = redelivered
        .iter()
        .map(|m| m.message.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, [replies[1].as_str(), replies[2].as_str()]);
    assert!(redelivered.iter().all(|m| m.attempt == 2));
    let result = again.ack(&names).await;
    assert_eq!(result.acknowledged.len(), 2);
    // Acknowledging again is harmless.
    let result = again.ack(&names[..1]).await;
    assert_eq!(result.acknowledged.len(), 1);

    // The acknowledgement is the institution's retrieval, in the evidence the resident holds.
    let keys = published_keys(&fed).await;
    let bundle = eventually("the reply's evidence is signed", || async {
        let answer = evidence_client(&fed, CENTRE)
            .get_evidence_bundle(bearer(
                GetEvidenceBundleRequest {
                    name: replies[0].clone(),
                    recipient: String::new(),
                },
                &token,
            ))
            .await
            .ok()?
            .into_inner();
        let bundle: Bundle = serde_json::from_str(&answer.bundle_json).unwrap();
        (answer.pending_records == 0 && bundle.entries.len() == 3).then_some(bundle)
    })
    .await;
    let verified = evidence::verify_bundle(&bundle, Some(&keys), &[]).unwrap();
    assert_eq!(
        events_of(&verified.records, PENSIONS),
        [Event::Accepted, Event::Placed, Event::Retrieved]
    );
    drop(again);
    fed.stop().await;
}

/// What the platform refuses anywhere is not stored here either: control characters (other
/// than tab and line breaks) in a subject or body, an eIDAS identifier Latvia does not accept
/// (`LV/LV/...`, or for another country) as a recipient; each at its field. The same letter
/// without them is sent.
async fn control_characters_and_foreign_identifiers_are_refused_at_their_field(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        "onestop.eaddress.v1.MessageService",
    )
    .await;
    let db = pool(&fed).await;
    let token = resident_token(&fed, oidc::LV_RESIDENT).await;
    activate(&fed, &token, "").await;
    let mut institution = messages(&fed, INSTITUTION);
    let refused_at = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        violations(&status)
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>()
    };
    let status = institution
        .send_message(SendMessageRequest {
            subject: "Lēmums\u{0}".into(),
            body: "Jums \u{1b}[8mpiešķirta\u{1b}[0m pensija.".into(),
            ..letter("controls", &[RESIDENT])
        })
        .await
        .unwrap_err();
    assert_eq!(refused_at(status), ["subject", "body"]);
    let status = institution
        .send_message(letter(
            "eidas",
            &["eidas:LV/LV/38001085718", "eidas:EE/FI/38001085718"],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused_at(status), ["recipients[0]", "recipients[1]"]);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM messages").await, 0);
    // Tab and line breaks are text.
    institution
        .send_message(SendMessageRequest {
            body: "Lēmums:\r\n\tpiešķirta vecuma pensija.".into(),
            ..letter("clean", &[RESIDENT])
        })
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM messages").await, 1);
    fed.stop().await;
}
