//! The tonic handlers: the contract's messages to and from the domain's, and nothing else.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use onestop_platform::caller::Caller;
use onestop_platform::clock::timestamp;
use onestop_platform::paging;
use onestop_platform::requests::Fingerprint;
use onestop_proto::eaddress::v1 as pb;
use onestop_proto::eaddress::v1::evidence_service_server::EvidenceService;
use onestop_proto::eaddress::v1::mailbox_service_server::MailboxService;
use onestop_proto::eaddress::v1::message_service_server::MessageService;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::blobs::{MAX_CHUNK_BYTES, Read, UploadError};
use crate::error::EaddressError;
use crate::incoming::IncomingMessage;
use crate::model::{Delivery, DeliveryState, Mailbox, Message};
use crate::service::{Eaddress, Outgoing, Who, message_id};
use onestop_platform::inbox::{self, AckOutcome, Incoming, MAX_WINDOW};

/// The handlers of the three e-address services.
#[derive(Clone, Debug)]
pub struct EaddressApi {
    eaddress: Arc<Eaddress>,
    shutdown: CancellationToken,
}

impl EaddressApi {
    /// Handlers over the service; open streams end at `shutdown`.
    pub fn new(eaddress: Arc<Eaddress>, shutdown: CancellationToken) -> Self {
        Self { eaddress, shutdown }
    }
}

fn who<T>(request: &Request<T>) -> Result<(Who, String), Status> {
    let caller = Caller::of(request)?;
    Ok((Who::of(caller), caller.request_key()))
}

fn mailbox_pb(mailbox: Mailbox) -> pb::Mailbox {
    pb::Mailbox {
        address: mailbox.address,
        active: mailbox.active,
        notice_email: mailbox.notice_email,
        delegates: mailbox.delegates,
        activate_time: mailbox.activate_time.map(timestamp),
    }
}

fn state_pb(state: DeliveryState) -> i32 {
    (match state {
        DeliveryState::Accepted => pb::DeliveryState::Accepted,
        DeliveryState::Placed => pb::DeliveryState::Placed,
        DeliveryState::Retrieved => pb::DeliveryState::Retrieved,
        DeliveryState::DeemedDelivered => pb::DeliveryState::DeemedDelivered,
        DeliveryState::NotDelivered => pb::DeliveryState::NotDelivered,
    }) as i32
}

fn message_pb(message: Message, delivery: Delivery) -> pb::Message {
    pb::Message {
        name: message.name(),
        thread_id: message.thread_id,
        sender: message.sender,
        subject: message.subject,
        body: message.body,
        document_type: message.document_type,
        attachments: message
            .attachments
            .into_iter()
            .map(|a| pb::Attachment {
                file_name: a.file_name,
                media_type: a.media_type,
                size: a.size,
                sha256: a.sha256,
            })
            .collect(),
        accept_time: Some(timestamp(message.accept_time)),
        recipient: delivery.recipient,
        state: state_pb(delivery.state),
        place_time: delivery.place_time.map(timestamp),
        retrieve_time: delivery.retrieve_time.map(timestamp),
        hidden_from_delegates: message.hidden_from_delegates,
    }
}

#[tonic::async_trait]
impl MailboxService for EaddressApi {
    async fn lookup_mailboxes(
        &self,
        request: Request<pb::LookupMailboxesRequest>,
    ) -> Result<Response<pb::LookupMailboxesResponse>, Status> {
        let (who, _) = who(&request)?;
        let found = self
            .eaddress
            .lookup(&who, &request.get_ref().addresses)
            .await?;
        Ok(Response::new(pb::LookupMailboxesResponse {
            mailboxes: found
                .into_iter()
                .map(|(address, active)| pb::MailboxState { address, active })
                .collect(),
        }))
    }

    async fn get_mailbox(
        &self,
        request: Request<pb::GetMailboxRequest>,
    ) -> Result<Response<pb::GetMailboxResponse>, Status> {
        let (who, _) = who(&request)?;
        let mailbox = self
            .eaddress
            .mailbox(&who, &request.get_ref().address)
            .await?;
        Ok(Response::new(pb::GetMailboxResponse {
            mailbox: Some(mailbox_pb(mailbox)),
        }))
    }

    async fn activate_mailbox(
        &self,
        request: Request<pb::ActivateMailboxRequest>,
    ) -> Result<Response<pb::ActivateMailboxResponse>, Status> {
        let (who, _) = who(&request)?;
        let mailbox = self
            .eaddress
            .activate(&who, &request.get_ref().notice_email)
            .await?;
        Ok(Response::new(pb::ActivateMailboxResponse {
            mailbox: Some(mailbox_pb(mailbox)),
        }))
    }

    async fn update_mailbox(
        &self,
        request: Request<pb::UpdateMailboxRequest>,
    ) -> Result<Response<pb::UpdateMailboxResponse>, Status> {
        let (who, _) = who(&request)?;
        let r = request.get_ref();
        let mailbox = self
            .eaddress
            .update_mailbox(&who, &r.notice_email, &r.add_delegates, &r.remove_delegates)
            .await?;
        Ok(Response::new(pb::UpdateMailboxResponse {
            mailbox: Some(mailbox_pb(mailbox)),
        }))
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::DownloadAttachmentResponse, Status>> + Send>>;
type IncomingStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamIncomingMessagesResponse, Status>> + Send>>;

fn ack_result_pb(outcomes: Vec<(String, AckOutcome)>) -> pb::AcknowledgeResult {
    let mut result = pb::AcknowledgeResult::default();
    for (id, outcome) in outcomes {
        let name = format!("messages/{id}");
        if outcome == AckOutcome::Acknowledged {
            result.acknowledged.push(name);
        } else {
            result.refused.push(pb::RefusedAcknowledgement {
                name,
                reason: outcome.reason().to_owned(),
            });
        }
    }
    result
}

fn upload_error(error: UploadError) -> EaddressError {
    match error {
        UploadError::Io(e) => EaddressError::Internal(e.to_string()),
        UploadError::TooLong { .. } => EaddressError::invalid("chunk", error.to_string()),
        UploadError::CutOff { .. } => EaddressError::refused("UPLOAD_CUT_OFF", error.to_string()),
        UploadError::DigestMismatch { .. } => {
            EaddressError::refused("DIGEST_MISMATCH", error.to_string())
        }
    }
}

#[tonic::async_trait]
impl MessageService for EaddressApi {
    async fn upload_attachment(
        &self,
        request: Request<Streaming<pb::UploadAttachmentRequest>>,
    ) -> Result<Response<pb::UploadAttachmentResponse>, Status> {
        let (who, _) = who(&request)?;
        if matches!(who, Who::Staff) {
            return Err(EaddressError::denied(
                "NOT_A_SENDER",
                "only member systems and persons upload attachments",
            )
            .into());
        }
        let mut parts = request.into_inner();
        let header = match parts.message().await? {
            Some(pb::UploadAttachmentRequest {
                part: Some(pb::upload_attachment_request::Part::Header(header)),
            }) => header,
            _ => {
                return Err(EaddressError::invalid(
                    "header",
                    "an upload starts with its header (size and SHA-256)",
                )
                .into());
            }
        };
        let max = self.eaddress.max_attachment_bytes();
        if header.size == 0 || header.size > max {
            return Err(EaddressError::TooLarge(format!(
                "an attachment is 1 to {max} bytes; {} were declared",
                header.size
            ))
            .into());
        }
        let sha = header.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EaddressError::invalid("header.sha256", "64 hex digits").into());
        }
        let mut upload = self
            .eaddress
            .blobs()
            .upload(header.size, &sha)
            .await
            .map_err(upload_error)?;
        loop {
            let next = tokio::select! {
                next = parts.message() => next,
                () = self.shutdown.cancelled() => {
                    return Err(Status::unavailable("the service is shutting down; upload again"));
                }
            };
            match next {
                Ok(Some(pb::UploadAttachmentRequest {
                    part: Some(pb::upload_attachment_request::Part::Chunk(chunk)),
                })) => {
                    if chunk.len() > MAX_CHUNK_BYTES {
                        return Err(EaddressError::invalid(
                            "chunk",
                            format!("a chunk is at most {MAX_CHUNK_BYTES} bytes"),
                        )
                        .into());
                    }
                    upload.write(&chunk).await.map_err(upload_error)?;
                }
                Ok(Some(_)) => {
                    return Err(EaddressError::invalid(
                        "header",
                        "only the first message of an upload is its header",
                    )
                    .into());
                }
                Ok(None) => break,
                // The client's stream broke (cancelled, reset): the upload is cut off, and the
                // temporary file goes with `upload`.
                Err(status) => return Err(status),
            }
        }
        let (sha256, size) = upload.finish().await.map_err(upload_error)?;
        self.eaddress
            .store()
            .put_blob(&sha256, size, onestop_platform::clock::now())
            .await
            .map_err(EaddressError::from)?;
        Ok(Response::new(pb::UploadAttachmentResponse { sha256, size }))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let (who, key) = who(&request)?;
        let r = request.into_inner();
        let fingerprint = Fingerprint::of(&r);
        let message = self
            .eaddress
            .send(
                &who,
                &key,
                &r.request_id,
                fingerprint,
                Outgoing {
                    sender: r.sender,
                    recipients: r.recipients,
                    subject: r.subject,
                    body: r.body,
                    document_type: r.document_type,
                    thread_id: r.thread_id,
                    attachments: r
                        .attachments
                        .into_iter()
                        .map(|a| (a.sha256, a.file_name, a.media_type))
                        .collect(),
                    hidden_from_delegates: r.hidden_from_delegates,
                },
            )
            .await?;
        Ok(Response::new(pb::SendMessageResponse {
            name: message.name(),
            thread_id: message.thread_id,
            recipient_count: message.recipient_count,
            accept_time: Some(timestamp(message.accept_time)),
        }))
    }

    async fn list_messages(
        &self,
        request: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let (who, _) = who(&request)?;
        let r = request.get_ref();
        let page_size =
            paging::page_size(r.page_size).map_err(|e| EaddressError::invalid("page_size", e))?;
        let reader = self.eaddress.reader(&who, &r.mailbox).await?;
        let (page, next_page_token) = self
            .eaddress
            .list(
                &reader,
                r.unread_only,
                &r.thread_id,
                &r.document_type,
                page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages: page.into_iter().map(|(m, d)| message_pb(m, d)).collect(),
            next_page_token,
        }))
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let (who, _) = who(&request)?;
        let r = request.get_ref();
        let id = message_id(&r.name)?;
        let reader = self.eaddress.reader(&who, &r.mailbox).await?;
        let (message, delivery) = self.eaddress.read(&reader, id).await?;
        Ok(Response::new(pb::GetMessageResponse {
            message: Some(message_pb(message, delivery)),
        }))
    }

    type DownloadAttachmentStream = Chunks;
    type StreamIncomingMessagesStream = IncomingStream;

    async fn stream_incoming_messages(
        &self,
        request: Request<Streaming<pb::StreamIncomingMessagesRequest>>,
    ) -> Result<Response<IncomingStream>, Status> {
        let (who, _) = who(&request)?;
        let mut requests = request.into_inner();
        let open = match requests.message().await? {
            Some(pb::StreamIncomingMessagesRequest {
                kind: Some(pb::stream_incoming_messages_request::Kind::Open(open)),
            }) => open,
            Some(_) => {
                return Err(
                    EaddressError::invalid("kind", "the first message must be `open`").into(),
                );
            }
            None => {
                return Err(
                    EaddressError::invalid("kind", "the stream ended before `open`").into(),
                );
            }
        };
        let mailbox = self.eaddress.incoming_mailbox(&who, &open.mailbox)?;
        if open.max_unacknowledged == 0 || open.max_unacknowledged > MAX_WINDOW {
            return Err(EaddressError::invalid(
                "open.max_unacknowledged",
                format!("must be 1-{MAX_WINDOW}"),
            )
            .into());
        }
        let incoming = requests.map(|message| match message {
            Ok(pb::StreamIncomingMessagesRequest {
                kind: Some(pb::stream_incoming_messages_request::Kind::Ack(ack)),
            }) => ack
                .names
                .iter()
                .map(|name| message_id(name).map(str::to_owned))
                .collect::<Result<Vec<_>, _>>()
                .map(Incoming::Ack),
            Ok(pb::StreamIncomingMessagesRequest {
                kind: Some(pb::stream_incoming_messages_request::Kind::Open(_)),
            }) => Ok(Incoming::Misplaced("`open` comes only first")),
            Ok(_) => Ok(Incoming::Misplaced("a message must be `open` or `ack`")),
            Err(status) => Err(EaddressError::Unavailable(format!(
                "the consumer's stream failed: {}",
                status.message()
            ))),
        });
        // Small: what is queued here is already leased; the window is the consumer's own.
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        // The stream's work stays in the stream's span, so each delivery's span is under it.
        tokio::spawn(
            inbox::run(
                self.eaddress.clone(),
                mailbox,
                open.max_unacknowledged,
                Box::pin(incoming),
                sender,
                self.shutdown.clone(),
            )
            .instrument(tracing::Span::current()),
        );
        let responses =
            tokio_stream::wrappers::ReceiverStream::new(receiver).map(|item| match item {
                Ok(inbox::Outgoing::Delivery(delivery)) => {
                    let IncomingMessage {
                        message,
                        delivery,
                        attempt,
                        lease_until,
                    } = *delivery;
                    Ok(pb::StreamIncomingMessagesResponse {
                        kind: Some(pb::stream_incoming_messages_response::Kind::Message(
                            pb::IncomingMessage {
                                message: Some(message_pb(message, delivery)),
                                attempt,
                                lease_expire_time: Some(timestamp(lease_until)),
                            },
                        )),
                    })
                }
                Ok(inbox::Outgoing::AckResult(outcomes)) => {
                    Ok(pb::StreamIncomingMessagesResponse {
                        kind: Some(pb::stream_incoming_messages_response::Kind::AckResult(
                            ack_result_pb(outcomes),
                        )),
                    })
                }
                Err(error) => Err(Status::from(error)),
            });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn download_attachment(
        &self,
        request: Request<pb::DownloadAttachmentRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let (who, _) = who(&request)?;
        let r = request.get_ref();
        let id = message_id(&r.name)?;
        let attachment = self
            .eaddress
            .attachment(&who, &r.mailbox, id, &r.sha256)
            .await?;
        let mut content = self
            .eaddress
            .blobs()
            .open_content(&attachment.sha256)
            .await
            .map_err(|e| {
                EaddressError::DataLoss(format!(
                    "the attachment's content is missing from storage: {e}"
                ))
            })?;
        let shutdown = self.shutdown.clone();
        // One chunk is read ahead at most: the client's pace sets the reading's.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let item = match content.next().await {
                    Ok(Read::Chunk(chunk)) => Ok(pb::DownloadAttachmentResponse { chunk }),
                    Ok(Read::End) => return,
                    Ok(Read::Altered) => Err(Status::from(EaddressError::DataLoss(
                        "the stored attachment no longer matches its SHA-256: it was altered"
                            .into(),
                    ))),
                    Err(e) => Err(Status::from(EaddressError::Internal(e.to_string()))),
                };
                let last = item.is_err();
                tokio::select! {
                    sent = tx.send(item) => if sent.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
                if last {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream.map(|item| item)) as Chunks))
    }
}

#[tonic::async_trait]
impl EvidenceService for EaddressApi {
    async fn list_evidence_keys(
        &self,
        _request: Request<pb::ListEvidenceKeysRequest>,
    ) -> Result<Response<pb::ListEvidenceKeysResponse>, Status> {
        let keys = self.eaddress.keys().await?;
        Ok(Response::new(pb::ListEvidenceKeysResponse {
            keys: keys
                .into_iter()
                .map(|k| {
                    let fingerprint = k.fingerprint();
                    pb::EvidenceKey {
                        public_key: base64_decode(&k.public_key),
                        key_id: k.key_id,
                        algorithm: k.algorithm,
                        fingerprint,
                    }
                })
                .collect(),
        }))
    }

    async fn get_evidence_bundle(
        &self,
        request: Request<pb::GetEvidenceBundleRequest>,
    ) -> Result<Response<pb::GetEvidenceBundleResponse>, Status> {
        let (who, _) = who(&request)?;
        let r = request.get_ref();
        let id = message_id(&r.name)?;
        let (bundle, pending) = self.eaddress.bundle(&who, id, &r.recipient).await?;
        let bundle_json = serde_json::to_string_pretty(&bundle)
            .map_err(|e| EaddressError::Internal(e.to_string()))?;
        Ok(Response::new(pb::GetEvidenceBundleResponse {
            bundle_json,
            pending_records: u32::try_from(pending).unwrap_or(u32::MAX),
        }))
    }

    async fn get_tree_head(
        &self,
        request: Request<pb::GetTreeHeadRequest>,
    ) -> Result<Response<pb::GetTreeHeadResponse>, Status> {
        let head = self.eaddress.tree_head(request.get_ref().tree_size).await?;
        Ok(Response::new(pb::GetTreeHeadResponse {
            tree_head: Some(pb::TreeHead {
                tree_size: head.tree_size,
                root_hash: hex::decode(&head.root_hash).unwrap_or_default(),
                sign_time: onestop_platform::db::from_millis(head.time_ms)
                    .ok()
                    .map(timestamp),
                head: base64_decode(&head.head),
                key_id: head.key_id,
                signature: base64_decode(&head.signature),
            }),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let r = request.get_ref();
        let proof = self
            .eaddress
            .consistency(r.first_tree_size, r.second_tree_size)
            .await?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}
