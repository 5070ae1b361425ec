//! The test-only echo service, registered and served like any platform service (mutual TLS,
//! caller authentication), so that every kind of call can be sent through the gateway.

use std::pin::Pin;

use futures_util::Stream;
use onestop_cli::services::{Prepared, Service, Serving};
use onestop_platform::caller::Caller;
use onestop_platform::server::Services;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// The generated code of `onestop.testing.v1`.
#[allow(missing_docs, unused_qualifications, clippy::all)]
pub mod pb {
    tonic::include_proto!("onestop.testing.v1");
}

use pb::echo_service_server::{EchoService, EchoServiceServer};
onestop_proto::message_limits!(pb::echo_service_server::EchoServiceServer);
use pb::{EchoRequest, EchoResponse, WhoamiRequest, WhoamiResponse};

/// A unary call with this text never answers.
pub const HANG: &str = "hang";

/// Notified when a call that never answers has begun.
pub static HANGING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The echo service's gRPC name.
pub const SERVICE: &str = pb::echo_service_server::SERVICE_NAME;

struct Echo;

fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(Caller::of(request)?.identity.to_string())
}

fn whoami(request: &Request<WhoamiRequest>) -> Result<Response<WhoamiResponse>, Status> {
    let caller = Caller::of(request)?;
    let person = caller.person.as_deref();
    Ok(Response::new(WhoamiResponse {
        caller: caller.identity.to_string(),
        subject: person.map(|p| p.sub.clone()).unwrap_or_default(),
        level: person.map(|p| p.auth.level.to_string()).unwrap_or_default(),
        actor: person
            .and_then(|p| p.act.as_ref())
            .map(|a| a.sub.clone())
            .unwrap_or_default(),
        mandate_id: person
            .and_then(|p| p.mandate.as_ref())
            .map(|m| m.id.clone())
            .unwrap_or_default(),
        mandate_services: person
            .and_then(|p| p.mandate.as_ref())
            .map(|m| m.services.clone())
            .unwrap_or_default(),
        staff_centre: person
            .and_then(|p| p.staff.as_ref())
            .and_then(|s| s.centre.clone())
            .unwrap_or_default(),
    }))
}

type Answers = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.text == HANG {
            // A call that never finishes by itself, to see what shutdown does with it.
            HANGING.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(Response::new(EchoResponse {
            text: r.text,
            caller,
            sequence: 0,
            payload: r.payload,
        }))
    }

    async fn whoami(
        &self,
        request: Request<WhoamiRequest>,
    ) -> Result<Response<WhoamiResponse>, Status> {
        whoami(&request)
    }

    async fn whoami_strict(
        &self,
        request: Request<WhoamiRequest>,
    ) -> Result<Response<WhoamiResponse>, Status> {
        whoami(&request)
    }

    type ServerStreamStream = Answers;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Answers>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let answers = (0..r.repeat).map(move |sequence| {
            Ok(EchoResponse {
                text: r.text.clone(),
                caller: caller.clone(),
                sequence,
                payload: r.payload.clone(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(answers))))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let caller = caller(&request)?;
        let mut stream = request.into_inner();
        let mut texts = Vec::new();
        let mut bytes = 0usize;
        while let Some(message) = stream.message().await? {
            bytes += message.payload.len();
            texts.push(message.text);
        }
        Ok(Response::new(EchoResponse {
            text: texts.join(","),
            caller,
            sequence: u32::try_from(bytes).unwrap_or(u32::MAX),
            payload: Vec::new(),
        }))
    }

    type BidiStream = Answers;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let caller = caller(&request)?;
        let stream = request.into_inner();
        let mut sequence = 0;
        let answers = stream.map(move |message| {
            let message = message?;
            sequence += 1;
            Ok(EchoResponse {
                text: message.text,
                caller: caller.clone(),
                sequence,
                payload: message.payload,
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// The echo service, registered like any platform service: the test federation runs it, routes
/// it and issues its certificate through this registration alone.
pub const REGISTRATION: Service = Service {
    name: "echo",
    grpc_services: &[SERVICE],
    long_lived: &[],
    default_policy: r#"# The test echo service, for two members.
[[allow]]
member = "GOV/VSAA"
methods = ["onestop.testing.v1.EchoService/*"]

[[allow]]
member = "GOV/NVA"
methods = ["onestop.testing.v1.EchoService/*"]

[[allow]]
member = "MUN/GULBENE/kac"
methods = ["onestop.testing.v1.EchoService/Whoami*"]

[[require_person]]
methods = ["onestop.testing.v1.EchoService/Whoami*"]

[[require_person]]
methods = ["onestop.testing.v1.EchoService/WhoamiStrict"]
min_level = "high"
"#,
    from_file: |_, _| anyhow::bail!("the echo service runs in tests only"),
    local: |local| {
        let config = local.server;
        Ok(Prepared::new(
            config.listen,
            Default::default(),
            move |listener, shutdown| {
                Box::pin(async move {
                    let mut services = Services::new(&config);
                    services.add(EchoServiceServer::new(Echo));
                    let serving: Serving = Box::pin(async move {
                        onestop_platform::server::serve(&config, services, listener, shutdown)
                            .await?;
                        Ok(())
                    });
                    Ok(serving)
                })
            },
        ))
    },
};
