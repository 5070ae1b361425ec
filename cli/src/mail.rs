//! The e-address commands: a mailbox's owner activates it and reads it, an institution's system
//! sends official messages with attachments (streamed from disk), and anyone holding a message's
//! evidence bundle verifies it offline. Output as in [`crate::client`]: JSON on standard output,
//! notes and errors on standard error.

use std::path::PathBuf;

use anyhow::{Context, bail};
use onestop_eaddress::evidence::{self, Bundle, PublicKey};
use onestop_proto::eaddress::v1 as pb;
use pb::evidence_service_client::EvidenceServiceClient;
use pb::mailbox_service_client::MailboxServiceClient;
use pb::message_service_client::MessageServiceClient;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Connection, emit, emit_pretty, failed, note, request_id, time_json};

/// The largest chunk an upload sends.
const CHUNK: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// onestop mailbox

/// What a mailbox's owner (or a sender looking up recipients) does.
#[derive(clap::Subcommand)]
pub enum MailboxCommand {
    /// Activate the calling person's mailbox (`--token`).
    Activate {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// Where content-free notices of new messages go.
        #[arg(long, default_value = "")]
        notice_email: String,
    },
    /// Show the caller's own mailbox.
    Show {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// A member system's own address, or its company's; empty for a person's own.
        #[arg(long, default_value = "")]
        address: String,
    },
    /// Which addresses have an active e-address (as a sender).
    Lookup {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// Addresses: `lv:DDMMYY-NNNNN`, `eidas:CC/DD/id`, `company:NNNNNNNNNNN`, `member:...`.
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

fn mailbox_json(mailbox: Option<&pb::Mailbox>) -> Value {
    mailbox.map_or(Value::Null, |m| {
        json!({
            "address": m.address,
            "active": m.active,
            "notice_email": m.notice_email,
            "delegates": m.delegates,
            "activate_time": time_json(m.activate_time.as_ref()),
        })
    })
}

/// Runs a `mailbox` command.
pub async fn mailbox(command: MailboxCommand) -> anyhow::Result<()> {
    match command {
        MailboxCommand::Activate {
            connection,
            notice_email,
        } => {
            let answer = MailboxServiceClient::new(connection.open().await?)
                .activate_mailbox(pb::ActivateMailboxRequest { notice_email })
                .await
                .map_err(failed)?;
            emit_pretty(&mailbox_json(answer.into_inner().mailbox.as_ref()))
        }
        MailboxCommand::Show {
            connection,
            address,
        } => {
            let answer = MailboxServiceClient::new(connection.open().await?)
                .get_mailbox(pb::GetMailboxRequest { address })
                .await
                .map_err(failed)?;
            emit_pretty(&mailbox_json(answer.into_inner().mailbox.as_ref()))
        }
        MailboxCommand::Lookup {
            connection,
            addresses,
        } => {
            let answer = MailboxServiceClient::new(connection.open().await?)
                .lookup_mailboxes(pb::LookupMailboxesRequest { addresses })
                .await
                .map_err(failed)?;
            for m in answer.into_inner().mailboxes {
                emit(&json!({"address": m.address, "active": m.active}).to_string())?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// onestop message

/// Sending and reading messages.
#[derive(clap::Subcommand)]
pub enum MessageCommand {
    /// Send an official message (as a member system) or a reply in a thread (with a person's
    /// `--token` and `--thread`).
    Send(SendArgs),
    /// List a mailbox's messages, one JSON line each, newest first.
    List {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// Another person's mailbox (as their delegate), or a member system's own address.
        #[arg(long, default_value = "")]
        mailbox: String,
        /// Only unopened messages.
        #[arg(long)]
        unread: bool,
        /// Only this thread.
        #[arg(long, default_value = "")]
        thread: String,
    },
    /// Read one message (the first reading is recorded as evidence).
    Read {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// The message, `messages/<id>`.
        #[arg(value_name = "MESSAGE")]
        message: String,
        /// The mailbox it is read from; empty for one's own.
        #[arg(long, default_value = "")]
        mailbox: String,
    },
    /// Receive the messages to a member system's mailbox as they arrive (one JSON line each),
    /// acknowledging each once printed, until `--count` messages, Ctrl-C or SIGTERM; what was
    /// not acknowledged is delivered again to the next stream.
    Incoming {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// The mailbox: the caller's own `member:` address (the default) or its company's.
        #[arg(long, default_value = "")]
        mailbox: String,
        /// Messages out unacknowledged at once (1-1000).
        #[arg(long, default_value_t = 10)]
        max_unacknowledged: u32,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Download an attachment to a file.
    Download {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// The message, `messages/<id>`.
        #[arg(value_name = "MESSAGE")]
        message: String,
        /// The attachment's SHA-256.
        #[arg(long)]
        sha256: String,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// The mailbox it is read from; empty for one's own (or as the sender).
        #[arg(long, default_value = "")]
        mailbox: String,
    },
}

/// `onestop message send`.
#[derive(clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    connection: Connection,
    /// A recipient's address; repeat for more.
    #[arg(long = "to")]
    to: Vec<String>,
    /// The subject.
    #[arg(long)]
    subject: String,
    /// The body (plain text).
    #[arg(long, default_value = "")]
    body: String,
    /// The document type, which decides the legal delivery rule.
    #[arg(long = "type", default_value = "letter")]
    document_type: String,
    /// A file to attach (`path` or `path=media/type`); repeat for more.
    #[arg(long = "attach")]
    attach: Vec<String>,
    /// The thread to continue.
    #[arg(long, default_value = "")]
    thread: String,
    /// Hide the message from the recipients' delegates.
    #[arg(long)]
    hidden_from_delegates: bool,
    /// The sender address, for a system sending from its company's address.
    #[arg(long, default_value = "")]
    sender: String,
    /// This send's id: repeat it to retry without sending twice.
    #[arg(long)]
    request_id: Option<String>,
}

fn media_type_of(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "json" => "application/json",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "edoc" | "asice" => "application/vnd.etsi.asic-e+zip",
        _ => "application/octet-stream",
    }
}

/// Streams a file to the e-address: read once to hash it, then again in chunks.
async fn upload_file(
    client: &mut MessageServiceClient<crate::client::Gateway>,
    path: &std::path::Path,
) -> anyhow::Result<pb::UploadAttachmentResponse> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
        size += n as u64;
    }
    let sha256 = hex::encode(context.finish().as_ref());
    let header = pb::UploadAttachmentRequest {
        part: Some(pb::upload_attachment_request::Part::Header(
            pb::UploadHeader { size, sha256 },
        )),
    };
    let file = tokio::fs::File::open(path).await?;
    let chunks = futures_util::stream::unfold((file, false), |(mut file, done)| async move {
        if done {
            return None;
        }
        let mut buffer = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut buffer[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        if filled == 0 {
            return None;
        }
        buffer.truncate(filled);
        let last = filled < CHUNK;
        Some((
            pb::UploadAttachmentRequest {
                part: Some(pb::upload_attachment_request::Part::Chunk(buffer)),
            },
            (file, last),
        ))
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter([header]), chunks);
    let answer = client.upload_attachment(stream).await.map_err(failed)?;
    Ok(answer.into_inner())
}

fn message_json(m: &pb::Message) -> Value {
    json!({
        "name": m.name,
        "thread_id": m.thread_id,
        "sender": m.sender,
        "recipient": m.recipient,
        "subject": m.subject,
        "body": m.body,
        "document_type": m.document_type,
        "state": pb::DeliveryState::try_from(m.state)
            .map(|s| s.as_str_name().trim_start_matches("DELIVERY_STATE_").to_ascii_lowercase())
            .unwrap_or_default(),
        "accept_time": time_json(m.accept_time.as_ref()),
        "place_time": time_json(m.place_time.as_ref()),
        "retrieve_time": time_json(m.retrieve_time.as_ref()),
        "hidden_from_delegates": m.hidden_from_delegates,
        "attachments": m.attachments.iter().map(|a| json!({
            "file_name": a.file_name,
            "media_type": a.media_type,
            "size": a.size,
            "sha256": a.sha256,
        })).collect::<Vec<_>>(),
    })
}

/// Runs a `message` command.
pub async fn message(command: MessageCommand) -> anyhow::Result<()> {
    match command {
        MessageCommand::Send(args) => send(args).await,
        MessageCommand::List {
            connection,
            mailbox,
            unread,
            thread,
        } => {
            let mut client = MessageServiceClient::new(connection.open().await?);
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_messages(pb::ListMessagesRequest {
                        mailbox: mailbox.clone(),
                        page_size: 100,
                        page_token,
                        unread_only: unread,
                        thread_id: thread.clone(),
                        document_type: String::new(),
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                for m in &page.messages {
                    emit(&message_json(m).to_string())?;
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                page_token = page.next_page_token;
            }
        }
        MessageCommand::Read {
            connection,
            message,
            mailbox,
        } => {
            let answer = MessageServiceClient::new(connection.open().await?)
                .get_message(pb::GetMessageRequest {
                    name: message,
                    mailbox,
                })
                .await
                .map_err(failed)?;
            let message = answer.into_inner().message.unwrap_or_default();
            emit_pretty(&message_json(&message))
        }
        MessageCommand::Incoming {
            connection,
            mailbox,
            max_unacknowledged,
            count,
        } => incoming(connection, mailbox, max_unacknowledged, count).await,
        MessageCommand::Download {
            connection,
            message,
            sha256,
            out,
            mailbox,
        } => {
            let mut chunks = MessageServiceClient::new(connection.open().await?)
                .download_attachment(pb::DownloadAttachmentRequest {
                    name: message,
                    mailbox,
                    sha256,
                })
                .await
                .map_err(failed)?
                .into_inner();
            let partial = out.with_extension("partial");
            let mut file = tokio::fs::File::create(&partial)
                .await
                .with_context(|| format!("creating {}", partial.display()))?;
            let mut size = 0u64;
            loop {
                match chunks.message().await {
                    Ok(Some(chunk)) => {
                        size += chunk.chunk.len() as u64;
                        file.write_all(&chunk.chunk).await?;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tokio::fs::remove_file(&partial).await;
                        return Err(failed(status));
                    }
                }
            }
            file.sync_all().await?;
            tokio::fs::rename(&partial, &out).await?;
            note(&format!("{size} bytes written to {}", out.display()));
            Ok(())
        }
    }
}

/// `onestop message incoming`.
async fn incoming(
    connection: Connection,
    mailbox: String,
    window: u32,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use pb::{
        stream_incoming_messages_request as request, stream_incoming_messages_response as response,
    };
    let mut client = MessageServiceClient::new(connection.open().await?);
    let (requests, outgoing) = tokio::sync::mpsc::channel(16);
    let send = |kind| {
        let requests = requests.clone();
        async move {
            requests
                .send(pb::StreamIncomingMessagesRequest { kind: Some(kind) })
                .await
                .map_err(|_| anyhow::anyhow!("the stream has closed"))
        }
    };
    // No more in flight than will be printed, so that fewer go out only to come back.
    let window = count.map_or(window, |c| {
        window.min(u32::try_from(c).unwrap_or(u32::MAX)).max(1)
    });
    send(request::Kind::Open(pb::OpenIncoming {
        mailbox,
        max_unacknowledged: window,
    }))
    .await?;
    let mut responses = client
        .stream_incoming_messages(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .map_err(failed)?
        .into_inner();
    let stop = onestop_platform::shutdown_signal();
    tokio::pin!(stop);
    let (mut received, mut pending_acks) = (0u64, 0u64);
    while !(pending_acks == 0 && count.is_some_and(|c| received >= c)) {
        let message = tokio::select! {
            () = &mut stop => return Ok(()),
            message = responses.message() => message.map_err(failed)?,
        };
        let Some(message) = message else {
            bail!("the platform ended the stream");
        };
        match message.kind {
            Some(response::Kind::Message(incoming)) => {
                if count.is_some_and(|c| received >= c) {
                    continue;
                }
                let message = incoming.message.unwrap_or_default();
                let mut line = message_json(&message);
                line["attempt"] = json!(incoming.attempt);
                emit(&line.to_string())?;
                received += 1;
                send(request::Kind::Ack(pb::AcknowledgeMessages {
                    names: vec![message.name],
                }))
                .await?;
                pending_acks += 1;
            }
            Some(response::Kind::AckResult(result)) => {
                pending_acks = pending_acks.saturating_sub(1);
                for refused in result.refused {
                    note(&format!(
                        "acknowledgement of {} refused: {}",
                        refused.name, refused.reason
                    ));
                }
            }
            None => {}
        }
    }
    Ok(())
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let mut client = MessageServiceClient::new(args.connection.open().await?);
    let mut attachments = Vec::new();
    for spec in &args.attach {
        let (path, media_type) = match spec.split_once('=') {
            Some((path, media)) => (PathBuf::from(path), media.to_owned()),
            None => (PathBuf::from(spec), media_type_of(spec.as_ref()).to_owned()),
        };
        let uploaded = upload_file(&mut client, &path).await?;
        note(&format!(
            "uploaded {} ({} bytes, SHA-256 {})",
            path.display(),
            uploaded.size,
            uploaded.sha256
        ));
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            bail!("{} has no usable file name", path.display());
        };
        attachments.push(pb::AttachmentRef {
            sha256: uploaded.sha256,
            file_name: file_name.to_owned(),
            media_type,
        });
    }
    let answer = client
        .send_message(pb::SendMessageRequest {
            request_id: request_id(args.request_id),
            sender: args.sender,
            recipients: args.to,
            subject: args.subject,
            body: args.body,
            document_type: args.document_type,
            thread_id: args.thread,
            attachments,
            hidden_from_delegates: args.hidden_from_delegates,
        })
        .await
        .map_err(failed)?
        .into_inner();
    emit_pretty(&json!({
        "name": answer.name,
        "thread_id": answer.thread_id,
        "recipient_count": answer.recipient_count,
        "accept_time": time_json(answer.accept_time.as_ref()),
    }))
}

// ---------------------------------------------------------------------------------------------
// onestop evidence

/// Evidence of delivery: fetch it, and verify it offline.
#[derive(clap::Subcommand)]
pub enum EvidenceCommand {
    /// Save the platform's evidence keys (a JSON array) to compare and verify against.
    Keys {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// Where to write them.
        #[arg(long, default_value = "evidence-keys.json")]
        out: PathBuf,
    },
    /// Save a message's evidence bundle (as its sender, or a recipient's side).
    Bundle {
        /// How to reach the gateway, as whom.
        #[command(flatten)]
        connection: Connection,
        /// The message, `messages/<id>`.
        #[arg(value_name = "MESSAGE")]
        message: String,
        /// Only this recipient's records (the sender); a recipient gets their own.
        #[arg(long, default_value = "")]
        recipient: String,
        /// Where to write it.
        #[arg(long, default_value = "evidence.json")]
        out: PathBuf,
    },
    /// Verify a bundle offline: every record's signature and inclusion in the signed tree head,
    /// and that the given attachment files are the ones the records name. Prints the records
    /// and exits with 0, or names the first thing that fails and exits with 1.
    Verify {
        /// The bundle file.
        bundle: PathBuf,
        /// The published keys (`onestop evidence keys`); without it, the bundle's own keys are
        /// used and their fingerprints printed to compare with the published ones.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// An attachment file to check against the records; repeat for more.
        #[arg(long)]
        attachment: Vec<PathBuf>,
    },
}

/// Runs an `evidence` command.
pub async fn evidence(command: EvidenceCommand) -> anyhow::Result<()> {
    match command {
        EvidenceCommand::Keys { connection, out } => {
            use base64::Engine;
            let answer = EvidenceServiceClient::new(connection.open().await?)
                .list_evidence_keys(pb::ListEvidenceKeysRequest {})
                .await
                .map_err(failed)?;
            let keys: Vec<PublicKey> = answer
                .into_inner()
                .keys
                .into_iter()
                .map(|k| PublicKey {
                    key_id: k.key_id,
                    algorithm: k.algorithm,
                    public_key: base64::engine::general_purpose::STANDARD.encode(k.public_key),
                })
                .collect();
            std::fs::write(&out, serde_json::to_string_pretty(&keys)?)
                .with_context(|| format!("writing {}", out.display()))?;
            for key in &keys {
                note(&format!(
                    "{}: fingerprint {}",
                    key.key_id,
                    key.fingerprint()
                ));
            }
            note(&format!("{} keys written to {}", keys.len(), out.display()));
            Ok(())
        }
        EvidenceCommand::Bundle {
            connection,
            message,
            recipient,
            out,
        } => {
            let answer = EvidenceServiceClient::new(connection.open().await?)
                .get_evidence_bundle(pb::GetEvidenceBundleRequest {
                    name: message,
                    recipient,
                })
                .await
                .map_err(failed)?
                .into_inner();
            std::fs::write(&out, &answer.bundle_json)
                .with_context(|| format!("writing {}", out.display()))?;
            if answer.pending_records > 0 {
                note(&format!(
                    "{} records are not signed yet; fetch the bundle again for them",
                    answer.pending_records
                ));
            }
            note(&format!("written to {}", out.display()));
            Ok(())
        }
        EvidenceCommand::Verify {
            bundle,
            keys,
            attachment,
        } => verify(&bundle, keys.as_deref(), &attachment),
    }
}

fn verify(
    path: &std::path::Path,
    keys: Option<&std::path::Path>,
    attachments: &[PathBuf],
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let bundle: Bundle = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an evidence bundle", path.display()))?;
    let trusted: Option<Vec<PublicKey>> = match keys {
        Some(keys) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(keys)
                    .with_context(|| format!("reading {}", keys.display()))?,
            )
            .with_context(|| format!("{} is not a list of keys", keys.display()))?,
        ),
        None => None,
    };
    let mut files = Vec::new();
    for file in attachments {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        files.push((file.display().to_string(), evidence::sha256(&bytes)));
    }
    let verified = evidence::verify_bundle(&bundle, trusted.as_deref(), &files)
        .map_err(|e| anyhow::anyhow!("verification failed: {e}"))?;
    for record in &verified.records {
        emit(
            &json!({
                "log_index": record.log_index,
                "event": record.event.as_str(),
                "recipient": record.recipient,
                "time": record.time,
                "reason": record.reason,
            })
            .to_string(),
        )?;
    }
    if verified.keys_from_bundle {
        for key in &bundle.keys {
            note(&format!(
                "key {} was taken from the bundle itself: compare its fingerprint {} with the published one (`onestop evidence keys`)",
                key.key_id,
                key.fingerprint()
            ));
        }
    }
    note(&format!(
        "verified: {} records of {} in the signed tree of {} records (root {})",
        verified.records.len(),
        bundle.message,
        verified.tree_size,
        hex::encode(verified.root_hash)
    ));
    Ok(())
}
