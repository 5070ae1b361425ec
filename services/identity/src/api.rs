//! The gRPC face of the identity service: decode, identify the calling system and person,
//! call the use cases, encode.

use std::sync::Arc;

use onestop_platform::caller::Caller;
use onestop_platform::clock::{self, now, timestamp};
use onestop_platform::contract::{self, document_pb, level_pb, member_pb, person_id_pb};
use onestop_platform::identity::Member;
use onestop_platform::paging;
use onestop_platform::person::Level;
use onestop_platform::requests::{Fingerprint, Request as Once};
use onestop_platform::tokens::{Claims, Staff, Subject};
use onestop_proto::identity::v1 as pb;
use onestop_proto::r#type::v1 as types;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::error::IdentityError;
use crate::providers::Audience;
use crate::service::{Identity, NewMandate, Tokens};
use crate::store::{Mandate, Profile};

/// The `onestop.identity.v1.IdentityService` implementation.
pub struct IdentityApi {
    identity: Arc<Identity>,
}

impl IdentityApi {
    /// Serves the use cases.
    pub fn new(identity: Arc<Identity>) -> Self {
        Self { identity }
    }
}

fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<OffsetDateTime, IdentityError> {
    clock::from_timestamp(t).ok_or_else(|| IdentityError::invalid(field, "not a valid time"))
}

fn level_of(field: &str, value: i32) -> Result<Option<Level>, IdentityError> {
    contract::level_of(value).map_err(|e| IdentityError::invalid(field, e))
}

fn tokens_pb(tokens: Tokens) -> pb::Tokens {
    pb::Tokens {
        access_token: tokens.access_token,
        access_token_expire_time: Some(timestamp(tokens.access_expire_time)),
        refresh_token: tokens.refresh_token,
        session_expire_time: Some(timestamp(tokens.session_expire_time)),
    }
}

fn staff_pb(sub: &str, staff: &Staff) -> pb::StaffMember {
    let staff_id = match Subject::parse(sub) {
        Ok(Subject::Staff { staff_id, .. }) => staff_id,
        _ => String::new(),
    };
    pb::StaffMember {
        staff_id,
        institution: Member::parse(&staff.institution)
            .ok()
            .map(|m| member_pb(&m)),
        centre: staff.centre.clone().unwrap_or_default(),
        roles: staff.roles.clone(),
    }
}

fn person_pb(profile: &Profile) -> pb::Person {
    let subject = match (Subject::parse(&profile.sub), &profile.staff) {
        (Ok(Subject::Staff { .. }), Some(staff)) => {
            Some(pb::person::Subject::Staff(staff_pb(&profile.sub, staff)))
        }
        (Ok(subject), _) => person_id_pb(&subject).map(pb::person::Subject::Resident),
        (Err(_), _) => None,
    };
    pb::Person {
        subject,
        given_name: profile.given_name.clone().unwrap_or_default(),
        family_name: profile.family_name.clone().unwrap_or_default(),
        provider_id: profile.auth.provider.clone(),
        level: level_pb(profile.auth.level),
        country: profile.auth.country.clone().unwrap_or_default(),
        auth_time: Some(prost_types::Timestamp {
            seconds: profile.auth.time,
            nanos: 0,
        }),
    }
}

/// A `PersonId` as a subject, checked.
fn principal_of(field: &str, id: Option<types::PersonId>) -> Result<Subject, IdentityError> {
    contract::subject_of(id.as_ref()).map_err(|(part, why)| {
        let field = if part.is_empty() {
            field.to_owned()
        } else {
            format!("{field}.{part}")
        };
        IdentityError::invalid(&field, why)
    })
}

fn document_of(value: i32) -> Result<&'static str, IdentityError> {
    contract::document_of(value).map_err(|e| IdentityError::invalid("identity_document", e))
}

fn mandate_pb(mandate: Mandate) -> pb::Mandate {
    pb::Mandate {
        name: format!("mandates/{}", mandate.id),
        principal: Subject::parse(&mandate.principal)
            .ok()
            .and_then(|s| person_id_pb(&s)),
        services: mandate.services,
        valid_from: Some(timestamp(mandate.valid_from)),
        valid_until: Some(timestamp(mandate.valid_until)),
        document_sha256: mandate.document_sha256,
        identity_document: document_pb(&mandate.identity_document),
        centre: mandate.centre,
        registered_by: Some(staff_pb(&mandate.clerk, &mandate.clerk_staff)),
        create_time: Some(timestamp(mandate.create_time)),
        revoke_time: mandate.revoked.as_ref().map(|r| timestamp(r.time)),
        revoke_reason: mandate.revoked.map(|r| r.reason).unwrap_or_default(),
    }
}

fn mandate_id(name: &str) -> Result<&str, IdentityError> {
    name.strip_prefix("mandates/")
        .filter(|id| !id.is_empty() && id.len() <= 64 && !id.contains('/'))
        .ok_or_else(|| IdentityError::invalid("name", "`mandates/{mandate_id}`"))
}

/// The person the gateway verified, if the call carried a token.
fn person_of(caller: &Caller) -> Option<&Claims> {
    caller.person.as_deref()
}

#[tonic::async_trait]
impl pb::identity_service_server::IdentityService for IdentityApi {
    async fn list_providers(
        &self,
        request: Request<pb::ListProvidersRequest>,
    ) -> Result<Response<pb::ListProvidersResponse>, Status> {
        Caller::of(&request)?;
        let providers = self
            .identity
            .providers()
            .map(|p| pb::Provider {
                id: p.config.id.clone(),
                audience: (match p.config.audience {
                    Audience::Residents => pb::Audience::Residents,
                    Audience::Staff => pb::Audience::Staff,
                }) as i32,
                levels: p.levels().into_iter().map(level_pb).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListProvidersResponse { providers }))
    }

    async fn start_login(
        &self,
        request: Request<pb::StartLoginRequest>,
    ) -> Result<Response<pb::StartLoginResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let r = request.into_inner();
        let minimum = level_of("minimum_level", r.minimum_level)?;
        let (url, state, expire) = self
            .identity
            .start_login(&caller, &r.provider_id, &r.redirect_uri, minimum, now())
            .await?;
        Ok(Response::new(pb::StartLoginResponse {
            authorization_url: url,
            state,
            expire_time: Some(timestamp(expire)),
        }))
    }

    async fn complete_login(
        &self,
        request: Request<pb::CompleteLoginRequest>,
    ) -> Result<Response<pb::CompleteLoginResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let r = request.into_inner();
        // The provider's error, when it sent one back instead of a code.
        let provider_error =
            (!r.error.is_empty()).then_some((r.error.as_str(), r.error_description.as_str()));
        let (tokens, profile) = self
            .identity
            .complete_login(&caller, &r.state, &r.code, provider_error, now())
            .await?;
        Ok(Response::new(pb::CompleteLoginResponse {
            tokens: Some(tokens_pb(tokens)),
            person: Some(person_pb(&profile)),
        }))
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let tokens = self
            .identity
            .refresh(&caller, &request.get_ref().refresh_token, now())
            .await?;
        Ok(Response::new(pb::RefreshSessionResponse {
            tokens: Some(tokens_pb(tokens)),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        self.identity
            .logout(&caller, &request.get_ref().refresh_token, now())
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn get_key_set(
        &self,
        request: Request<pb::GetKeySetRequest>,
    ) -> Result<Response<pb::GetKeySetResponse>, Status> {
        Caller::of(&request)?;
        Ok(Response::new(pb::GetKeySetResponse {
            jwks_json: self.identity.jwks(),
        }))
    }

    async fn list_ended_sessions(
        &self,
        request: Request<pb::ListEndedSessionsRequest>,
    ) -> Result<Response<pb::ListEndedSessionsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let since = request
            .get_ref()
            .ended_since
            .as_ref()
            .map(|t| from_timestamp("ended_since", t))
            .transpose()?;
        let (session_ids, read_time) = self
            .identity
            .ended_sessions(&caller.identity, caller.via_gateway, since, now())
            .await?;
        Ok(Response::new(pb::ListEndedSessionsResponse {
            session_ids,
            read_time: Some(timestamp(read_time)),
        }))
    }

    async fn register_mandate(
        &self,
        request: Request<pb::RegisterMandateRequest>,
    ) -> Result<Response<pb::RegisterMandateResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let r = request.into_inner();
        let once = Once::new(
            &caller.identity,
            &r.request_id,
            "RegisterMandate",
            Fingerprint::of(&r),
        )
        .map_err(IdentityError::from)?;
        let new = NewMandate {
            principal: principal_of("principal", r.principal)?,
            services: r.services,
            valid_from: r
                .valid_from
                .as_ref()
                .map(|t| from_timestamp("valid_from", t))
                .transpose()?,
            valid_until: from_timestamp(
                "valid_until",
                r.valid_until
                    .as_ref()
                    .ok_or_else(|| IdentityError::invalid("valid_until", "required"))?,
            )?,
            document_sha256: r.document_sha256,
            identity_document: document_of(r.identity_document)?,
        };
        let mandate = self
            .identity
            .register_mandate(&caller.identity, person_of(&caller), &once, new, now())
            .await?;
        Ok(Response::new(pb::RegisterMandateResponse {
            mandate: Some(mandate_pb(mandate)),
        }))
    }

    async fn get_mandate(
        &self,
        request: Request<pb::GetMandateRequest>,
    ) -> Result<Response<pb::GetMandateResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = mandate_id(&request.get_ref().name)?;
        let mandate = self.identity.mandate(person_of(caller), id).await?;
        Ok(Response::new(pb::GetMandateResponse {
            mandate: Some(mandate_pb(mandate)),
        }))
    }

    async fn list_mandates(
        &self,
        request: Request<pb::ListMandatesRequest>,
    ) -> Result<Response<pb::ListMandatesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.get_ref();
        let size =
            paging::page_size(r.page_size).map_err(|m| IdentityError::invalid("page_size", m))?;
        let principal = r
            .principal
            .clone()
            .map(|p| principal_of("principal", Some(p)))
            .transpose()?;
        let (mandates, next) = self
            .identity
            .mandates(person_of(caller), principal, &r.page_token, size)
            .await?;
        Ok(Response::new(pb::ListMandatesResponse {
            mandates: mandates.into_iter().map(mandate_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn revoke_mandate(
        &self,
        request: Request<pb::RevokeMandateRequest>,
    ) -> Result<Response<pb::RevokeMandateResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.get_ref();
        let id = mandate_id(&r.name)?;
        let mandate = self
            .identity
            .revoke(&caller.identity, person_of(caller), id, &r.reason, now())
            .await?;
        Ok(Response::new(pb::RevokeMandateResponse {
            mandate: Some(mandate_pb(mandate)),
        }))
    }

    async fn exchange_mandate(
        &self,
        request: Request<pb::ExchangeMandateRequest>,
    ) -> Result<Response<pb::ExchangeMandateResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.get_ref();
        let id = mandate_id(&r.name)?;
        let (token, expire) = self
            .identity
            .exchange(
                &caller.identity,
                person_of(caller),
                id,
                r.services.clone(),
                now(),
            )
            .await?;
        Ok(Response::new(pb::ExchangeMandateResponse {
            access_token: token,
            expire_time: Some(timestamp(expire)),
        }))
    }
}
