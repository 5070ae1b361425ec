//! The gRPC face of the e-forms service: decode, identify the caller, call the registry, encode.

use std::sync::Arc;

use onestop_platform::caller::Caller;
use onestop_platform::clock::{now, timestamp};
use onestop_platform::identity::Member;
use onestop_platform::paging;
use onestop_platform::requests::{Fingerprint, Request as Once};
use onestop_proto::forms::v1 as pb;
use onestop_proto::r#type::v1 as types;
use tonic::{Request, Response, Status};

use crate::error::FormsError;
use crate::model::{self, Choice, Field, Form, FormVersion, Localized};
use crate::registry::{NewForm, NewVersion, Registry};

/// The `onestop.forms.v1.FormsService` implementation.
pub struct FormsApi {
    registry: Arc<Registry>,
}

impl FormsApi {
    /// Serves a registry.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

fn invalid(field: &str, message: String) -> FormsError {
    FormsError::InvalidField {
        field: field.to_owned(),
        message,
    }
}

fn page_size(requested: i32) -> Result<u32, FormsError> {
    paging::page_size(requested).map_err(|m| invalid("page_size", m))
}

#[tonic::async_trait]
impl pb::forms_service_server::FormsService for FormsApi {
    async fn create_form(
        &self,
        request: Request<pb::CreateFormRequest>,
    ) -> Result<Response<pb::CreateFormResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let r = request.into_inner();
        let once = Once::new(&caller, &r.request_id, "CreateForm", Fingerprint::of(&r))
            .map_err(FormsError::from)?;
        let owner = member("owner", r.owner)?;
        let new = NewForm {
            id: r.form_id,
            owner,
            title: localized(r.title),
            description: localized(r.description),
            schema_json: r.schema_json,
            fields: r.fields.into_iter().map(field).collect(),
        };
        let (form, version) = self.registry.create(&caller, &once, new, now()).await?;
        Ok(Response::new(pb::CreateFormResponse {
            form: Some(form_pb(&form)),
            version: Some(version_pb(version)),
        }))
    }

    async fn get_form(
        &self,
        request: Request<pb::GetFormRequest>,
    ) -> Result<Response<pb::GetFormResponse>, Status> {
        Caller::of(&request)?;
        let id = model::parse_form_name(&request.get_ref().name).map_err(|m| invalid("name", m))?;
        let form = self.registry.form(&id).await?;
        Ok(Response::new(pb::GetFormResponse {
            form: Some(form_pb(&form)),
        }))
    }

    async fn list_forms(
        &self,
        request: Request<pb::ListFormsRequest>,
    ) -> Result<Response<pb::ListFormsResponse>, Status> {
        Caller::of(&request)?;
        let r = request.into_inner();
        let size = page_size(r.page_size)?;
        let owner = r.owner.map(|o| member("owner", Some(o))).transpose()?;
        let (forms, next) = self
            .registry
            .forms(&r.page_token, owner.as_ref(), size)
            .await?;
        Ok(Response::new(pb::ListFormsResponse {
            forms: forms.iter().map(form_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn publish_form_version(
        &self,
        request: Request<pb::PublishFormVersionRequest>,
    ) -> Result<Response<pb::PublishFormVersionResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let r = request.into_inner();
        let once = Once::new(
            &caller,
            &r.request_id,
            "PublishFormVersion",
            Fingerprint::of(&r),
        )
        .map_err(FormsError::from)?;
        let id = model::parse_form_name(&r.parent).map_err(|m| invalid("parent", m))?;
        let new = NewVersion {
            schema_json: r.schema_json,
            fields: r.fields.into_iter().map(field).collect(),
            breaking: r.breaking,
            title: r.title.map(|t| localized(Some(t))),
        };
        let version = self
            .registry
            .publish(&caller, &once, &id, new, now())
            .await?;
        Ok(Response::new(pb::PublishFormVersionResponse {
            version: Some(version_pb(version)),
        }))
    }

    async fn get_form_version(
        &self,
        request: Request<pb::GetFormVersionRequest>,
    ) -> Result<Response<pb::GetFormVersionResponse>, Status> {
        Caller::of(&request)?;
        let (id, which) =
            model::parse_version_name(&request.get_ref().name).map_err(|m| invalid("name", m))?;
        let version = self.registry.version(&id, which).await?;
        Ok(Response::new(pb::GetFormVersionResponse {
            version: Some(version_pb(version)),
        }))
    }

    async fn list_form_versions(
        &self,
        request: Request<pb::ListFormVersionsRequest>,
    ) -> Result<Response<pb::ListFormVersionsResponse>, Status> {
        Caller::of(&request)?;
        let r = request.into_inner();
        let id = model::parse_form_name(&r.parent).map_err(|m| invalid("parent", m))?;
        let size = page_size(r.page_size)?;
        let (versions, next) = self.registry.versions(&id, &r.page_token, size).await?;
        Ok(Response::new(pb::ListFormVersionsResponse {
            versions: versions.into_iter().map(version_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn deprecate_form_version(
        &self,
        request: Request<pb::DeprecateFormVersionRequest>,
    ) -> Result<Response<pb::DeprecateFormVersionResponse>, Status> {
        let caller = Caller::of(&request)?.identity.clone();
        let r = request.into_inner();
        let once = Once::new(
            &caller,
            &r.request_id,
            "DeprecateFormVersion",
            Fingerprint::of(&r),
        )
        .map_err(FormsError::from)?;
        let (id, which) = model::parse_version_name(&r.name).map_err(|m| invalid("name", m))?;
        let model::VersionRef::Number(number) = which else {
            return Err(invalid("name", "name a numbered version, not `latest`".into()).into());
        };
        let version = self
            .registry
            .deprecate(&caller, &once, &id, number, &r.reason, now())
            .await?;
        Ok(Response::new(pb::DeprecateFormVersionResponse {
            version: Some(version_pb(version)),
        }))
    }

    async fn validate_form_data(
        &self,
        request: Request<pb::ValidateFormDataRequest>,
    ) -> Result<Response<pb::ValidateFormDataResponse>, Status> {
        Caller::of(&request)?;
        let r = request.into_inner();
        let (id, which) = model::parse_version_name(&r.name).map_err(|m| invalid("name", m))?;
        let validated = self.registry.validate(&id, which, &r.data_json).await?;
        Ok(Response::new(pb::ValidateFormDataResponse {
            version: validated.version.clone(),
            title: Some(localized_pb(&validated.title)),
            subject_fields: validated.subject_fields().to_vec(),
        }))
    }
}

fn member(field: &str, id: Option<types::MemberId>) -> Result<Member, FormsError> {
    let id = id.ok_or_else(|| invalid(field, "name the owning institution".into()))?;
    Member::new(&id.member_class, &id.member_code, &id.subsystem)
        .map_err(|e| invalid(field, e.to_string()))
}

fn localized(text: Option<types::LocalizedText>) -> Localized {
    let text = text.unwrap_or_default();
    Localized {
        lv: text.lv,
        en: text.en,
    }
}

fn localized_pb(text: &Localized) -> types::LocalizedText {
    types::LocalizedText {
        lv: text.lv.clone(),
        en: text.en.clone(),
    }
}

fn field(f: pb::FormField) -> Field {
    Field {
        pointer: f.pointer,
        label: localized(f.label),
        help: f.help.map(|h| localized(Some(h))),
        widget: f.widget,
        choices: f
            .choices
            .into_iter()
            .map(|c| Choice {
                value: c.value,
                label: localized(c.label),
            })
            .collect(),
    }
}

fn field_pb(f: Field) -> pb::FormField {
    pb::FormField {
        pointer: f.pointer,
        label: Some(localized_pb(&f.label)),
        help: f.help.as_ref().map(localized_pb),
        widget: f.widget,
        choices: f
            .choices
            .into_iter()
            .map(|c| pb::FieldChoice {
                label: Some(localized_pb(&c.label)),
                value: c.value,
            })
            .collect(),
    }
}

fn form_pb(form: &Form) -> pb::Form {
    pb::Form {
        name: form.name(),
        owner: Some(types::MemberId {
            member_class: form.owner.class.clone(),
            member_code: form.owner.code.clone(),
            subsystem: String::new(),
        }),
        title: Some(localized_pb(&form.title)),
        description: Some(localized_pb(&form.description)),
        latest_version: i32::try_from(form.latest_version).unwrap_or(i32::MAX),
        create_time: Some(timestamp(form.create_time)),
        update_time: Some(timestamp(form.update_time)),
    }
}

fn version_pb(version: FormVersion) -> pb::FormVersion {
    let name = version.name();
    let state = if version.deprecation.is_some() {
        pb::FormVersionState::Deprecated
    } else {
        pb::FormVersionState::Active
    };
    // Stored schemas parse: they were checked when published.
    let subject_fields = serde_json::from_str(&version.schema_json)
        .map(|schema| crate::schema::subject_fields(&schema))
        .unwrap_or_default();
    pb::FormVersion {
        name,
        subject_fields,
        version: i32::try_from(version.version).unwrap_or(i32::MAX),
        schema_json: version.schema_json,
        fields: version.fields.into_iter().map(field_pb).collect(),
        state: state.into(),
        breaking: version.breaking,
        deprecation_reason: version
            .deprecation
            .as_ref()
            .map(|d| d.reason.clone())
            .unwrap_or_default(),
        create_time: Some(timestamp(version.create_time)),
        deprecate_time: version.deprecation.as_ref().map(|d| timestamp(d.time)),
    }
}
