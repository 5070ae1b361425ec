//! Decisions to applicants' e-addresses: the notification outbox, written in the transaction
//! that records a decision, is drained into the e-address service, called directly over
//! internal mutual TLS with this process's own certificate (the e-address lets the `routing`
//! component send in the deciding institution's name). Each notification is sent with a
//! request id derived from its own id, so a send repeated after a crash between the send and
//! marking it drained is answered from the e-address's record: one message per decision.

use std::sync::Arc;
use std::time::Duration;

use onestop_platform::config::ServerConfig;
use onestop_platform::telemetry;
use onestop_proto::eaddress::v1 as pb;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::service::sha256_hex;
use crate::store::{Notification, Store};

/// How long one call to the e-address may take.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How often the outbox is looked at besides being woken by a decision (other replicas'
/// decisions, earlier failures).
const SWEEP: Duration = Duration::from_secs(5);
/// Notifications per pass.
const BATCH: i64 = 100;

/// The e-address service, as routing calls it.
#[derive(Clone, Debug)]
pub struct EaddressClient {
    client: MessageServiceClient<Channel>,
}

impl EaddressClient {
    /// A lazily connecting client to the e-address at `address`, which must present the
    /// `eaddress` component's certificate (named `server_name` in TLS).
    pub fn connect(
        server: &ServerConfig,
        address: &str,
        server_name: &str,
    ) -> Result<Self, String> {
        let channel =
            onestop_platform::client::to_component(server, address, server_name, "eaddress")
                .map_err(|e| e.to_string())?;
        Ok(Self {
            client: MessageServiceClient::new(channel)
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(4 << 20),
        })
    }

    /// Sends one decision's message (uploading its document first).
    async fn deliver(
        &self,
        notification: &Notification,
        document: Option<(String, String, Vec<u8>)>,
    ) -> Result<(), tonic::Status> {
        let payload: serde_json::Value =
            serde_json::from_str(&notification.payload).unwrap_or_default();
        let text = |key: &str| payload[key].as_str().unwrap_or_default().to_owned();
        let mut attachments = Vec::new();
        if let Some((title, media_type, content)) = document {
            let sha256 = sha256_hex(&content);
            let size = content.len() as u64;
            let mut parts = vec![pb::UploadAttachmentRequest {
                part: Some(pb::upload_attachment_request::Part::Header(
                    pb::UploadHeader {
                        size,
                        sha256: sha256.clone(),
                    },
                )),
            }];
            parts.extend(
                content
                    .chunks(1 << 20)
                    .map(|chunk| pb::UploadAttachmentRequest {
                        part: Some(pb::upload_attachment_request::Part::Chunk(chunk.to_vec())),
                    }),
            );
            let mut upload = tonic::Request::new(tokio_stream::iter(parts));
            upload.set_timeout(CALL_DEADLINE);
            let span = telemetry::client_span(
                &mut upload,
                "/onestop.eaddress.v1.MessageService/UploadAttachment",
                "routing",
            );
            let uploaded = self
                .client
                .clone()
                .upload_attachment(upload)
                .instrument(span.clone())
                .await;
            telemetry::record_outcome(&span, &uploaded);
            uploaded?;
            attachments.push(pb::AttachmentRef {
                sha256,
                file_name: file_name(&title, &media_type),
                media_type,
            });
        }
        let recipient = if notification.recipient.starts_with("lv:")
            || notification.recipient.starts_with("eidas:")
        {
            notification.recipient.clone()
        } else {
            format!("member:{}", notification.recipient)
        };
        let note = text("note");
        let application = text("application");
        let mut send = tonic::Request::new(pb::SendMessageRequest {
            request_id: format!("routing-decision-{}", notification.id),
            sender: format!("member:{}", text("by")),
            recipients: vec![recipient],
            subject: format!("Lēmums / Decision: {application}"),
            body: format!(
                "Jūsu pieteikumā {application} ir pieņemts lēmums.\nA decision was made on your application {application}.\n\n{note}"
            ),
            document_type: "decision".to_owned(),
            thread_id: String::new(),
            attachments,
            hidden_from_delegates: false,
        });
        send.set_timeout(CALL_DEADLINE);
        let span = telemetry::client_span(
            &mut send,
            "/onestop.eaddress.v1.MessageService/SendMessage",
            "routing",
        );
        let sent = self
            .client
            .clone()
            .send_message(send)
            .instrument(span.clone())
            .await;
        telemetry::record_outcome(&span, &sent);
        sent?;
        Ok(())
    }
}

/// A file name for a decision document: its title without `/`, with an extension for common
/// media types.
fn file_name(title: &str, media_type: &str) -> String {
    let base: String = title
        .chars()
        .filter(|c| !c.is_control())
        .map(|c| if c == '/' { '-' } else { c })
        .take(200)
        .collect();
    let base = if base.trim().is_empty() {
        "decision".to_owned()
    } else {
        base
    };
    let extension = match media_type {
        "application/pdf" => ".pdf",
        "text/plain" => ".txt",
        "application/json" => ".json",
        "application/xml" | "text/xml" => ".xml",
        _ => "",
    };
    if extension.is_empty() || base.ends_with(extension) {
        base
    } else {
        format!("{base}{extension}")
    }
}

/// Drains the outbox until `shutdown`: woken by `decided`, and every [`SWEEP`].
pub async fn keep_draining(
    store: Store,
    eaddress: EaddressClient,
    decided: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) = drain(&store, &eaddress).await {
            tracing::warn!(%error, "decisions did not all reach the e-address; they are sent again");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = decided.notified() => {}
            () = tokio::time::sleep(SWEEP) => {}
        }
    }
}

async fn drain(store: &Store, eaddress: &EaddressClient) -> Result<(), String> {
    loop {
        let batch = store
            .undrained_notifications(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        for notification in &batch {
            let document = store
                .decision_document(&notification.application_id)
                .await
                .map_err(|e| e.to_string())?;
            // Sent later, in a trace of its own linked to the call that decided.
            let span = tracing::info_span!(
                "decision.send",
                onestop.component = "routing",
                notification = %notification.id,
            );
            let cause = serde_json::from_str::<serde_json::Value>(&notification.payload)
                .ok()
                .and_then(|payload| payload["traceparent"].as_str().map(str::to_owned));
            telemetry::linked_to(&span, cause.as_deref());
            match eaddress
                .deliver(notification, document)
                .instrument(span)
                .await
            {
                Ok(()) => {}
                // The e-address refuses this notification for good (a recipient it cannot
                // address): retrying cannot help, so it is logged and set aside.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                    ) =>
                {
                    tracing::error!(notification = %notification.id, code = ?status.code(), message = status.message(), "a decision cannot be sent to the e-address");
                }
                Err(status) => {
                    return Err(format!("{:?}: {}", status.code(), status.message()));
                }
            }
            store
                .mark_drained(&notification.id, onestop_platform::clock::now())
                .await
                .map_err(|e| e.to_string())?;
        }
        if batch.len() < BATCH as usize {
            return Ok(());
        }
    }
}
