//! The gateway under attack: what a hostile or broken client does is bounded, falls on its own
//! calls, and never holds back another member. Attackers come from 127.0.0.2 (the whole of
//! 127.0.0.0/8 is loopback), victims from 127.0.0.1, so that limits per source address can be
//! seen to work.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use onestop_integration_tests::attack;
use onestop_integration_tests::echo::pb::EchoRequest;
use onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient;
use onestop_integration_tests::{Backend, TestFederation, echo, tls_refusal};
use onestop_platform::identity::SpiffeId;
use onestop_platform::pki::{Ca, IssueRequest};
use onestop_proto::forms::v1::GetFormRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use time::OffsetDateTime;
use tonic::Code;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// A second attacking address, for attacks that run side by side.
const ATTACKER_TOO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const VICTIM: &str = "demo-centre";

/// p50 and p99 of some latencies, in milliseconds.
fn percentiles(mut latencies: Vec<Duration>) -> (f64, f64) {
    latencies.sort();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[index].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}

/// A victim member's calls (`count` echo calls with a 16 KiB payload each, so that data must
/// flow) and their p50/p99 in milliseconds; every call must succeed.
async fn victim_calls(fed: &TestFederation, name: &str, count: usize) -> (f64, f64) {
    let mut echo = EchoServiceClient::new(fed.gateway_client(name));
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            echo.unary(EchoRequest {
                text: i.to_string(),
                repeat: 0,
                payload: vec![3u8; 16 * 1024],
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("victim call {i} got no answer within 10 s"))
        .unwrap_or_else(|status| panic!("victim call {i} failed: {status:?}"));
        assert_eq!(answer.into_inner().payload.len(), 16 * 1024);
        latencies.push(started.elapsed());
    }
    percentiles(latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_holds_back_no_one_else() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    fed.issue_member("nva", "GOV/NVA/registry");
    let (p50, p99) = victim_calls(&fed, "nva", 50).await;
    eprintln!("victim before the attack: p50 {p50:.2} ms, p99 {p99:.2} ms");

    // The attacker announces a zero window for every call, then opens 40 streams whose answers
    // total 1 MiB each: 40 MiB the gateway can never deliver.
    let config = attack::client_tls(&fed.pki, Some("demo-institution"));
    let mut attacker = attack::raw_h2(fed.gateway, ATTACKER, config, 0)
        .await
        .expect("the attacker connects");
    let request = attack::grpc_message(&EchoRequest {
        text: "never read".into(),
        repeat: 16,
        payload: vec![9u8; 64 * 1024],
    });
    let path = format!("/{}/ServerStream", echo::SERVICE);
    let stalled = attacker.stall(&path, &request, 40).await;
    assert_eq!(stalled.len(), 40);

    // Another member's calls to the same service carry data as usual.
    let (p50, p99) = victim_calls(&fed, "nva", 200).await;
    eprintln!("victim during the stalled-reader attack: p50 {p50:.2} ms, p99 {p99:.2} ms");
    assert!(p99 < 1000.0, "the victim waited {p99:.0} ms at p99");
    drop(stalled);
    drop(attacker);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_member_cannot_exhaust_the_gateway() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.handshake_timeout_ms = Duration::from_millis(500);
        options.limits.first_request_timeout_ms = Duration::from_millis(500);
        options.limits.max_unidentified_per_source = 16;
        options.limits.handshakes_per_source_per_second = 1000;
    })
    .await;
    // Plain TCP connections that never start TLS, and anonymous TLS connections that never
    // send the HTTP/2 preface, all from one address.
    let tcp = attack::silent_tcp(fed.gateway, ATTACKER, 300).await;
    let anonymous = attack::client_tls(&fed.pki, None);
    let tls = attack::silent_tls(fed.gateway, ATTACKER_TOO, anonymous, 100).await;
    assert!(
        tls.len() >= 16,
        "the anonymous sessions within the limit: {}",
        tls.len()
    );
    eprintln!(
        "attacker holds {} TCP and {} TLS connections",
        tcp.len(),
        tls.len()
    );

    // A member keeps connecting and calling with normal latency meanwhile.
    let (p50, p99) = victim_calls(&fed, VICTIM_ECHO, 100).await;
    eprintln!("victim during the silent-connection attack: p50 {p50:.2} ms, p99 {p99:.2} ms");
    assert!(p99 < 1000.0, "the victim waited {p99:.0} ms at p99");
    for i in 0..5 {
        let mut forms = FormsServiceClient::new(fed.gateway_client(VICTIM));
        let started = Instant::now();
        forms
            .get_form(GetFormRequest {
                name: "forms/vsaa-old-age-pension".into(),
            })
            .await
            .unwrap_or_else(|status| panic!("new connection {i}: {status:?}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "connecting took {:?}",
            started.elapsed()
        );
    }

    // Every silent connection is closed by the gateway: over the limit at once, the others
    // when their handshake or first-request time runs out.
    let (total_tcp, total_tls) = (tcp.len(), tls.len());
    assert_eq!(
        tcp.closed_by_server(Duration::from_secs(5)).await,
        total_tcp
    );
    assert_eq!(
        tls.closed_by_server(Duration::from_secs(5)).await,
        total_tls
    );
    fed.stop().await;
}

/// Members behind one address (a municipality's NAT) with a client among them that opens
/// connections and never finishes them, and one that reconnects as fast as it can: the others
/// still connect at once, and what identified members do costs their address nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_address_is_not_shut_by_one_of_its_clients() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.max_unidentified_per_source = 16;
        options.limits.handshakes_per_source_per_second = 20;
    })
    .await;
    let member = attack::client_tls(&fed.pki, Some(VICTIM));
    let get_form = attack::grpc_message(&GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    });
    // A member reconnecting far more often than the address's budget of handshakes: identified
    // connections spend none of it.
    for attempt in 0..60 {
        let mut connection = attack::raw_h2(fed.gateway, ATTACKER, member.clone(), 1 << 20)
            .await
            .unwrap_or_else(|error| panic!("reconnection {attempt}: {error}"));
        drop(
            connection
                .stall("/onestop.forms.v1.FormsService/GetForm", &get_form, 1)
                .await,
        );
    }
    // Silent TCP connections fill every place the address has for unidentified ones ...
    let silent = attack::silent_tcp(fed.gateway, ATTACKER, 16).await;
    assert_eq!(silent.len(), 16);
    // ... and a member behind the same address still connects and calls at once: its
    // connection displaces the oldest silent one.
    for attempt in 0..3 {
        let started = Instant::now();
        let mut connection = attack::raw_h2(fed.gateway, ATTACKER, member.clone(), 1 << 20)
            .await
            .unwrap_or_else(|error| panic!("member connection {attempt}: {error}"));
        drop(
            connection
                .stall("/onestop.forms.v1.FormsService/GetForm", &get_form, 1)
                .await,
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "connecting took {:?}",
            started.elapsed()
        );
    }
    // One place was needed, once: the member's connections leave theirs when identified.
    let closed = silent.closed_by_server(Duration::from_secs(1)).await;
    assert_eq!(closed, 1, "the displaced silent connection is closed");
    fed.stop().await;
}

/// A member that reconnects in a loop is told so, and soon its address's new connections are
/// refused before their handshake (which costs the gateway far more than a call); members
/// elsewhere are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reconnecting_in_a_loop_is_refused_before_its_handshakes() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.handshakes_per_source_per_second = 20;
    })
    .await;
    let member = attack::client_tls(&fed.pki, Some(VICTIM));
    let get_form = attack::grpc_message(&GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    });
    let (mut served, mut told, mut not_connected) = (0, 0, 0);
    for _ in 0..200 {
        let Ok(mut connection) =
            attack::raw_h2(fed.gateway, ATTACKER, member.clone(), 1 << 20).await
        else {
            not_connected += 1;
            continue;
        };
        let Ok(response) = connection
            .start_call("/onestop.forms.v1.FormsService/GetForm", &get_form)
            .await
        else {
            not_connected += 1;
            continue;
        };
        match response.await {
            Ok(response) => match response.headers().get("grpc-status") {
                None => served += 1,
                Some(code) => {
                    assert_eq!(code, "8", "{response:?}");
                    let message = response.headers().get("grpc-message").unwrap();
                    assert!(
                        message
                            .to_str()
                            .unwrap()
                            .contains("connections%20a%20second"),
                        "{message:?}"
                    );
                    told += 1;
                }
            },
            Err(_) => not_connected += 1,
        }
    }
    eprintln!("reconnections: {served} served, {told} told to slow down, {not_connected} refused");
    // The burst (64 connections) is served; then the member is told; then its address spends
    // its budget and connections are refused before any handshake.
    assert!((64..150).contains(&served), "{served} served");
    assert!(told >= 1, "never told");
    assert!(
        not_connected >= 50,
        "only {not_connected} refused before their handshake"
    );
    // A member from another address is not affected.
    victim_calls(&fed, VICTIM_ECHO, 10).await;
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.idle_timeout_ms = Duration::from_millis(300);
    })
    .await;
    let member = attack::client_tls(&fed.pki, Some(VICTIM));
    let get_form = attack::grpc_message(&GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    });
    // One call, answered in full, then nothing: GOAWAY after the idle timeout.
    let mut idle = attack::raw_h2(fed.gateway, ATTACKER, member.clone(), 1 << 20)
        .await
        .expect("connect");
    drop(
        idle.stall("/onestop.forms.v1.FormsService/GetForm", &get_form, 1)
            .await,
    );
    assert!(
        idle.closed_within(Duration::from_secs(5)).await,
        "an idle connection stays open"
    );

    // A connection with a call still running is not idle, however long the call takes.
    let institution = attack::client_tls(&fed.pki, Some(VICTIM_ECHO));
    let mut busy = attack::raw_h2(fed.gateway, ATTACKER, institution, 0)
        .await
        .expect("connect");
    let request = attack::grpc_message(&EchoRequest {
        text: "slow reader".into(),
        repeat: 4,
        payload: vec![1u8; 64 * 1024],
    });
    let running = busy
        .stall(&format!("/{}/ServerStream", echo::SERVICE), &request, 1)
        .await;
    assert!(
        !busy.closed_within(Duration::from_millis(900)).await,
        "a connection with a call in flight was closed as idle"
    );
    drop(running);
    fed.stop().await;
}

/// The victim of the echo-based attacks: a member allowed to call the echo service.
const VICTIM_ECHO: &str = "demo-institution";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_limited_before_anyone_is_identified() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.handshakes_per_source_per_second = 20;
    })
    .await;
    let anonymous = attack::client_tls(&fed.pki, None);

    // Many calls on one anonymous connection: the first is answered (UNAUTHENTICATED), and the
    // connection takes no more.
    let mut raw = attack::raw_h2(fed.gateway, ATTACKER, anonymous.clone(), 65_535)
        .await
        .expect("an anonymous TLS session");
    let outcome = raw
        .flood("/onestop.forms.v1.FormsService/GetForm", &[], 500)
        .await;
    eprintln!("anonymous flood on one connection: {outcome:?}");
    // One call at a time, and GOAWAY after the first refusal: a call or two may cross it.
    assert!(outcome.answered <= 5, "{outcome:?}");
    assert_eq!(
        outcome.statuses.get("16").copied().unwrap_or(0),
        outcome.answered
    );

    // New connections from one address are held to its rate (bursts of twice the rate).
    let started = Instant::now();
    let mut sessions = 0;
    for _ in 0..200 {
        if attack::connect_tls(fed.gateway, ATTACKER, anonymous.clone())
            .await
            .is_ok()
        {
            sessions += 1;
        }
    }
    let allowed = 40.0 + 20.0 * started.elapsed().as_secs_f64() + 2.0;
    eprintln!(
        "{sessions} of 200 anonymous handshakes admitted in {:?}",
        started.elapsed()
    );
    assert!(
        f64::from(sessions) <= allowed,
        "{sessions} sessions, at most {allowed} allowed"
    );
    // Members from another address are not affected.
    victim_calls(&fed, VICTIM_ECHO, 10).await;
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_stream_messages_and_anonymous_calls_leave_other_members_alone() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    // A member asks reflection as fast as it can on eight streams ...
    let answers = Arc::new(AtomicUsize::new(0));
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let channel = fed.gateway_client(VICTIM_ECHO);
        let answers = answers.clone();
        attackers.spawn(async move {
            let questions = (0..100_000).map(|_| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            });
            let Ok(stream) = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter(questions))
                .await
            else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(_)) = stream.message().await {
                answers.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // ... while an anonymous client opens connection after connection and floods each.
    let anonymous = attack::client_tls(&fed.pki, None);
    let anonymous_calls = Arc::new(AtomicUsize::new(0));
    {
        let anonymous_calls = anonymous_calls.clone();
        let gateway = fed.gateway;
        attackers.spawn(async move {
            for _ in 0..100_000 {
                let Ok(mut raw) =
                    attack::raw_h2(gateway, ATTACKER, anonymous.clone(), 65_535).await
                else {
                    continue;
                };
                let outcome = raw
                    .flood("/onestop.forms.v1.FormsService/GetForm", &[], 50)
                    .await;
                anonymous_calls.fetch_add(outcome.answered, Ordering::Relaxed);
            }
        });
    }
    let started = Instant::now();
    let mut forms = FormsServiceClient::new(fed.gateway_client(VICTIM));
    let mut latencies = Vec::new();
    for i in 0..1000 {
        let call = Instant::now();
        forms
            .get_form(GetFormRequest {
                name: "forms/vsaa-old-age-pension".into(),
            })
            .await
            .unwrap_or_else(|status| panic!("victim call {i}: {status:?}"));
        latencies.push(call.elapsed());
    }
    let elapsed = started.elapsed().as_secs_f64();
    attackers.abort_all();
    let (p50, p99) = percentiles(latencies);
    let answered = answers.load(Ordering::Relaxed) as f64 / elapsed;
    let anonymous = anonymous_calls.load(Ordering::Relaxed) as f64 / elapsed;
    eprintln!(
        "victim during the stream-message and anonymous floods: p50 {p50:.2} ms, p99 {p99:.2} ms; \
         the flooding member got {answered:.0} stream answers/s (rate 500/s, burst 1000), \
         anonymous calls answered {anonymous:.0}/s"
    );
    assert!(p99 < 1000.0, "the victim waited {p99:.0} ms at p99");
    // Over the test's few seconds, the burst and the rate are all the flooding member gets.
    assert!(
        answered <= 500.0 + 1000.0 / elapsed + 50.0,
        "{answered:.0} answers/s"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_streams_count_against_the_members_rate() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.member_rate = (50, 10);
    })
    .await;
    // Reflection is a bidirectional stream: 60 questions on one call.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let questions: Vec<_> = (0..60)
        .map(|_| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .collect();
    let started = Instant::now();
    let mut answers = ServerReflectionClient::new(fed.gateway_client(VICTIM))
        .server_reflection_info(tokio_stream::iter(questions))
        .await
        .expect("reflection")
        .into_inner();
    let mut answered = 0;
    while answers.message().await.expect("an answer").is_some() {
        answered += 1;
    }
    let elapsed = started.elapsed();
    eprintln!("60 stream messages at 50/s with a burst of 10 took {elapsed:?}");
    assert_eq!(answered, 60, "the stream is slowed down, not cut");
    // 10 from the burst, then 50 more at 50 a second: no less than a second.
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_streams_cannot_crowd_out_calls_or_light_members() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.streams = (8, 2);
    })
    .await;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // Members with no rights at all open health watches, as many as they are let.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for i in 0..4 {
        let name = format!("watcher-{i}");
        fed.issue_member(&name, &format!("GOV/W{i}/watch"));
        let mut health = HealthClient::new(fed.gateway_client(&name));
        for _ in 0..3 {
            match health
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(stream) => held.push(stream.into_inner()),
                Err(status) => refused.push(crate::reason(&status)),
            }
        }
    }
    eprintln!("{} watches held; refused: {refused:?}", held.len());
    assert!(held.len() <= 7, "the last place is kept: {}", held.len());
    assert!(refused.iter().any(|r| r == "TOO_MANY_CALLS"), "{refused:?}");
    assert!(refused.iter().any(|r| r == "OVERLOADED"), "{refused:?}");

    // A member with nothing open still gets a watch, and calls are not touched at all.
    let mut health = HealthClient::new(fed.gateway_client(VICTIM));
    let watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a light member's watch");
    let mut forms = FormsServiceClient::new(fed.gateway_client(VICTIM));
    forms
        .get_form(GetFormRequest {
            name: "forms/vsaa-old-age-pension".into(),
        })
        .await
        .expect("calls have a budget of their own");
    drop((watch, held));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_callers_send_is_echoed_in_bounds() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let mut forms = FormsServiceClient::new(fed.gateway_client(VICTIM));
    // A 20 KB bogus name: the answer quotes a little of it, not all.
    let status = forms
        .get_form(GetFormRequest {
            name: format!("forms/{}", "x".repeat(20_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().len() < 1200,
        "{} bytes",
        status.message().len()
    );
    assert!(
        status.details().len() < 2048,
        "{} bytes",
        status.details().len()
    );

    // Metadata over the services' limit is told in a gRPC status.
    let mut request = tonic::Request::new(GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    });
    request
        .metadata_mut()
        .insert("x-bulk", "y".repeat(20_000).parse().unwrap());
    let status = forms.get_form(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(crate::reason(&status), "HEADERS_TOO_LARGE");

    // A 100 KB bearer token, and 100 KB of other metadata: each call is refused with its reason
    // and the connection goes on serving (HTTP/2 takes header blocks far above what a call may
    // carry, so that the refusal is a status, not the connection's end).
    for (header, value, code, why) in [
        (
            "authorization",
            format!("Bearer {}", "t".repeat(100_000)),
            Code::Unauthenticated,
            "TOKEN_TOO_LARGE",
        ),
        (
            "x-bulk",
            "y".repeat(100_000),
            Code::ResourceExhausted,
            "HEADERS_TOO_LARGE",
        ),
    ] {
        let mut request = tonic::Request::new(GetFormRequest {
            name: "forms/vsaa-old-age-pension".into(),
        });
        request
            .metadata_mut()
            .insert(header, value.parse().unwrap());
        let status = forms.get_form(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{header}: {status:?}");
        assert_eq!(crate::reason(&status), why, "{header}: {status:?}");
        forms
            .get_form(GetFormRequest {
                name: "forms/vsaa-old-age-pension".into(),
            })
            .await
            .expect("the connection goes on");
    }
    // Past what HTTP/2 takes, the call is refused there, and the connection still goes on.
    let mut request = tonic::Request::new(GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    });
    request
        .metadata_mut()
        .insert("x-bulk", "y".repeat(300_000).parse().unwrap());
    forms.get_form(request).await.unwrap_err();
    forms
        .get_form(GetFormRequest {
            name: "forms/vsaa-old-age-pension".into(),
        })
        .await
        .expect("the connection goes on after a refused header block");

    // A 3 MiB symbol asked of reflection is cut off at the gateway.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let question = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "s".repeat(3 * 1024 * 1024),
        )),
    };
    let answer = ServerReflectionClient::new(fed.gateway_client(VICTIM))
        .server_reflection_info(tokio_stream::iter([question]))
        .await;
    let text = match answer {
        Err(status) => status.message().len() + status.details().len(),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match stream.message().await {
                Err(status) => status.message().len() + status.details().len(),
                Ok(message) => format!("{message:?}").len(),
            }
        }
    };
    assert!(text < 4096, "{text} bytes came back");

    // A long method name is not written out whole either (it would be in logs too).
    let path = format!("/onestop.forms.v1.FormsService/{}", "M".repeat(10_000));
    let status = crate::refusal_of_path(fed.gateway_client(VICTIM), &path).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().len() < 400, "{}", status.message().len());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_only_to_the_component_a_route_names() {
    // A route claims the forms component, but its address leads to the echo service (through a
    // relay, since the echo service's port is known only once it runs); the echo service's
    // certificate says otherwise, so nothing is sent to it.
    let relay = onestop_integration_tests::relay::Relay::bind()
        .await
        .unwrap();
    let impostor = "onestop.testing.v1.ImpostorService";
    let address = relay.address.to_string();
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.extra_routes.push((
            impostor.to_owned(),
            onestop_gateway::Route {
                addresses: vec![address],
                component: "forms".into(),
            },
        ));
    })
    .await;
    relay.point_to(fed.echo);
    let status = crate::refusal_of_path(
        fed.gateway_client(VICTIM_ECHO),
        &format!("/{impostor}/Unary"),
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(crate::reason(&status), "UPSTREAM_UNAVAILABLE");
    assert!(relay.relayed() > 0, "the gateway did try the address");
    // The route whose certificate matches still works.
    let mut forms = FormsServiceClient::new(fed.gateway_client(VICTIM));
    forms
        .get_form(GetFormRequest {
            name: "forms/vsaa-old-age-pension".into(),
        })
        .await
        .expect("forms is served by forms");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_is_resumed_and_expired_certificates_lose_their_connection() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    // A client that would resume if the server let it (rustls clients keep tickets and ids).
    for versions in [&rustls::version::TLS13, &rustls::version::TLS12] {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls::pki_types::CertificateDer::pem_file_iter(fed.pki.join("ca.pem")).unwrap()
        {
            roots.add(ca.unwrap()).unwrap();
        }
        let chain =
            rustls::pki_types::CertificateDer::pem_file_iter(fed.pki.join(format!("{VICTIM}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(fed.pki.join(format!("{VICTIM}.key")))
                .unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(onestop_platform::tls::crypto_provider())
                .with_protocol_versions(&[versions])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::in_memory_sessions(64);
        let config = std::sync::Arc::new(config);
        for attempt in 0..3 {
            let stream =
                attack::connect_tls(fed.gateway, IpAddr::from([127, 0, 0, 1]), config.clone())
                    .await
                    .expect("TLS");
            assert_eq!(
                stream.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "connection {attempt} was resumed"
            );
        }
    }

    // A certificate valid for two more seconds: its connection works, then is cut at expiry,
    // and no call gets through on it or on a new one.
    let vsaa = SpiffeId::parse("spiffe://onestop.lv/member/GOV/VSAA/pensions").unwrap();
    let mut short = IssueRequest::new("short-lived", Some(vsaa), Duration::from_secs(2));
    short.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    fed.issue("short-lived", &short);
    let mut echo = EchoServiceClient::new(fed.gateway_client("short-lived"));
    echo.unary(EchoRequest::default())
        .await
        .expect("while valid");
    // Certificates count time in whole seconds.
    let expiry = std::time::SystemTime::from(short.not_after.replace_nanosecond(0).unwrap());
    // Calls go as fast as the gateway answers them for two seconds, so the member's rate
    // limit may refuse some first; those refusals are not the one this waits for.
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match echo.unary(EchoRequest::default()).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::task::yield_now().await
                }
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("refused within 10 s");
    assert!(
        std::time::SystemTime::now() >= expiry,
        "refused before expiry: {status:?}"
    );
    // A new connection gets no call through either (refused in the handshake, or on its first
    // call within the second the handshake still counts as valid).
    let mut again = EchoServiceClient::new(fed.gateway_client("short-lived"));
    let status = again.unary(EchoRequest::default()).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::Unauthenticated | Code::Unavailable | Code::Unknown
        ),
        "{status:?}"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_after_a_reload() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.reload_interval = Duration::from_millis(100);
    })
    .await;
    fed.issue_member("to-revoke", "GOV/VSAA/old-system");
    // A platform component's certificate, checked by the services themselves.
    let component = SpiffeId::parse("spiffe://onestop.lv/platform/retired").unwrap();
    fed.issue(
        "retired",
        &IssueRequest::new("retired", Some(component), Duration::from_secs(3600)),
    );
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(fed.forms_client("retired"));
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a component may ask a service");
    let mut echo = EchoServiceClient::new(fed.gateway_client("to-revoke"));
    echo.unary(EchoRequest::default())
        .await
        .expect("before revocation");

    let ca = Ca::load(&fed.pki).unwrap();
    let pem = std::fs::read_to_string(fed.pki.join("to-revoke.pem")).unwrap();
    assert_eq!(ca.revoke(&fed.pki, &pem).unwrap(), 1);
    let pem = std::fs::read_to_string(fed.pki.join("retired.pem")).unwrap();
    assert_eq!(ca.revoke(&fed.pki, &pem).unwrap(), 2);

    // The connection already open is refused on its next call once the list is reloaded ...
    let status = crate::first_refusal!(echo.unary(EchoRequest::default()));
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    // ... and a new one does not get a session.
    let refusal = tls_refusal(&fed.gateway.to_string(), &fed.pki, &fed.pki, "to-revoke").await;
    assert!(refusal.contains("CertificateRevoked"), "{refusal}");
    // The service refuses the revoked component the same way.
    let status =
        crate::first_refusal!(health.check(tonic_health::pb::HealthCheckRequest::default()));
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    // Others are not affected.
    victim_calls(&fed, VICTIM_ECHO, 5).await;
    fed.stop().await;
}
