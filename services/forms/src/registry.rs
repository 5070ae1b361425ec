//! The use cases of the e-forms service: creating forms, publishing and deprecating versions,
//! reading them, and validating data. Who may do what is decided here; the store only keeps.

use std::collections::HashMap;
use std::sync::RwLock;

use onestop_platform::identity::{Member, Principal, SpiffeId};
use serde_json::Value;
use time::OffsetDateTime;

use crate::compat;
use crate::error::FormsError;
use crate::model::{
    self, Field, Form, FormVersion, Localized, VersionRef, check_fields, check_form_id,
    check_request_id, check_text,
};
use crate::schema::{self, CompiledSchema};
use crate::store::{RequestKey, Store, StoreError};

/// A form to create.
#[derive(Clone, Debug)]
pub struct NewForm {
    /// Its id.
    pub id: String,
    /// The owning institution.
    pub owner: Member,
    /// Its title.
    pub title: Localized,
    /// What it is for.
    pub description: Localized,
    /// The first version's schema, as JSON text.
    pub schema_json: String,
    /// The first version's fields.
    pub fields: Vec<Field>,
}

/// A version to publish.
#[derive(Clone, Debug)]
pub struct NewVersion {
    /// The schema, as JSON text.
    pub schema_json: String,
    /// The fields.
    pub fields: Vec<Field>,
    /// Declared as narrowing.
    pub breaking: bool,
    /// A new title, if any.
    pub title: Option<Localized>,
}

/// The most versions a form may have.
pub const MAX_VERSIONS: u32 = 1000;
/// At most this many compiled schemas are kept.
pub const MAX_CACHED_SCHEMAS: usize = 10_000;
/// A page of versions stops growing past this many bytes of schema, to stay well inside the
/// largest reply.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// The key after which the next page starts, when this page is full.
fn next_key<T>(page: &[T], size: u32, key: impl Fn(&T) -> String) -> Option<String> {
    (page.len() == size as usize)
        .then(|| page.last().map(key))
        .flatten()
}

fn invalid(field: &str, message: String) -> FormsError {
    FormsError::InvalidField {
        field: field.to_owned(),
        message,
    }
}

/// A page of results and the key after which the next starts.
pub type Page<T> = (Vec<T>, Option<String>);

/// Forms and their versions, with compiled schemas cached per version.
pub struct Registry {
    store: Store,
    operators: Vec<Member>,
    /// Versions are immutable, so a compiled schema never goes stale; only versions validated
    /// against are cached, at most [`MAX_CACHED_SCHEMAS`].
    compiled: RwLock<HashMap<(String, u32), CompiledSchema>>,
}

impl Registry {
    /// A registry over a store; members of the `operators` institutions may manage every form.
    pub fn new(store: Store, operators: Vec<Member>) -> Self {
        Self {
            store,
            operators,
            compiled: RwLock::new(HashMap::new()),
        }
    }

    fn may_manage(&self, caller: &SpiffeId, owner: &Member) -> bool {
        match &caller.principal {
            Principal::Member(member) => {
                member.same_institution(owner)
                    || self.operators.iter().any(|op| member.same_institution(op))
            }
            Principal::Platform(_) => false,
        }
    }

    fn require_manager(
        &self,
        caller: &SpiffeId,
        owner: &Member,
        what: &str,
    ) -> Result<(), FormsError> {
        if self.may_manage(caller, owner) {
            Ok(())
        } else {
            Err(FormsError::PermissionDenied(format!(
                "{caller} may not {what}: only {owner} (the owner) or a platform operator may"
            )))
        }
    }

    /// Returns the resource a repeated request produced, after checking the method matches.
    async fn repeated(
        &self,
        caller: &SpiffeId,
        request_id: &str,
        method: &str,
    ) -> Result<Option<String>, FormsError> {
        check_request_id(request_id).map_err(|m| invalid("request_id", m))?;
        match self
            .store
            .find_request(&caller.to_string(), request_id)
            .await?
        {
            Some(recorded) if recorded.method == method => Ok(Some(recorded.resource)),
            Some(recorded) => Err(FormsError::RequestIdReused {
                request_id: request_id.to_owned(),
                method: recorded.method,
            }),
            None => Ok(None),
        }
    }

    /// After a write refused as conflicting: the resource this very request recorded meanwhile
    /// (a retry that raced the first attempt), or else `otherwise` (the conflict was another
    /// request's). A request id used by another method is reported as such.
    async fn raced(
        &self,
        caller: &SpiffeId,
        request_id: &str,
        method: &str,
        otherwise: FormsError,
    ) -> Result<String, FormsError> {
        self.repeated(caller, request_id, method)
            .await?
            .ok_or(otherwise)
    }

    /// Creates a form and its first version.
    pub async fn create(
        &self,
        caller: &SpiffeId,
        request_id: &str,
        new: NewForm,
        now: OffsetDateTime,
    ) -> Result<(Form, FormVersion), FormsError> {
        const METHOD: &str = "CreateForm";
        if let Some(resource) = self.repeated(caller, request_id, METHOD).await? {
            return self.form_and_version(&resource).await;
        }
        check_form_id(&new.id).map_err(|m| invalid("form_id", m))?;
        let owner = new.owner.institution();
        self.require_manager(caller, &owner, "create a form for this owner")?;
        invalid_text("title", &new.title, true)?;
        invalid_text("description", &new.description, false)?;
        invalid_fields(&new.fields)?;
        // Compiling proves the schema usable; it is cached when data is first validated.
        compile_apart(new.schema_json.clone()).await?;
        let form = Form {
            id: new.id.clone(),
            owner,
            title: new.title,
            description: new.description,
            latest_version: 1,
            create_time: now,
            update_time: now,
        };
        let version = FormVersion {
            form_id: new.id.clone(),
            version: 1,
            schema_json: new.schema_json,
            fields: new.fields,
            breaking: false,
            deprecation: None,
            create_time: now,
        };
        let key = RequestKey {
            caller: &caller.to_string(),
            request_id,
            method: METHOD,
        };
        match self.store.create_form(&form, &version, key).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::AlreadyExists(form.name());
                let resource = self.raced(caller, request_id, METHOD, otherwise).await?;
                return self.form_and_version(&resource).await;
            }
            Err(e) => return Err(e.into()),
        }
        Ok((form, version))
    }

    /// The form and version a recorded request produced.
    async fn form_and_version(&self, resource: &str) -> Result<(Form, FormVersion), FormsError> {
        let version = self.version_by_name(resource).await?;
        let form = self.form(&version.form_id).await?;
        Ok((form, version))
    }

    /// Publishes a new version.
    pub async fn publish(
        &self,
        caller: &SpiffeId,
        request_id: &str,
        form_id: &str,
        new: NewVersion,
        now: OffsetDateTime,
    ) -> Result<FormVersion, FormsError> {
        const METHOD: &str = "PublishFormVersion";
        if let Some(resource) = self.repeated(caller, request_id, METHOD).await? {
            return self.version_by_name(&resource).await;
        }
        let form = self.form(form_id).await?;
        self.require_manager(caller, &form.owner, "publish versions of this form")?;
        if let Some(title) = &new.title {
            invalid_text("title", title, true)?;
        }
        invalid_fields(&new.fields)?;
        if form.latest_version >= MAX_VERSIONS {
            return Err(invalid(
                "parent",
                format!(
                    "{} has {MAX_VERSIONS} versions, the most a form may have; create a new form",
                    form.name()
                ),
            ));
        }
        let (schema, _) = compile_apart(new.schema_json.clone()).await?;
        let previous = self
            .version(form_id, VersionRef::Number(form.latest_version))
            .await?;
        if !new.breaking {
            let old = schema::parse_json(&previous.schema_json, usize::MAX).map_err(|error| {
                FormsError::Store(StoreError::Corrupt(format!("stored schema: {error}")))
            })?;
            // Comparing large schemas is CPU work: keep it off the threads that serve calls.
            let narrowings = tokio::task::spawn_blocking(move || compat::narrowings(&old, &schema))
                .await
                .map_err(|e| {
                    FormsError::Store(StoreError::Corrupt(format!("comparison failed: {e}")))
                })?;
            if !narrowings.is_empty() {
                return Err(FormsError::Breaking {
                    previous: previous.version,
                    narrowings,
                });
            }
        }
        let version = FormVersion {
            form_id: form_id.to_owned(),
            version: form.latest_version + 1,
            schema_json: new.schema_json,
            fields: new.fields,
            breaking: new.breaking,
            deprecation: None,
            create_time: now,
        };
        let key = RequestKey {
            caller: &caller.to_string(),
            request_id,
            method: METHOD,
        };
        match self
            .store
            .publish_version(&version, form.latest_version, new.title.as_ref(), key)
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::Concurrent(form.name());
                let resource = self.raced(caller, request_id, METHOD, otherwise).await?;
                return self.version_by_name(&resource).await;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(version)
    }

    /// Deprecates a version.
    pub async fn deprecate(
        &self,
        caller: &SpiffeId,
        request_id: &str,
        form_id: &str,
        number: u32,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<FormVersion, FormsError> {
        const METHOD: &str = "DeprecateFormVersion";
        if let Some(resource) = self.repeated(caller, request_id, METHOD).await? {
            return self.version_by_name(&resource).await;
        }
        if reason.trim().is_empty() || reason.chars().count() > model::MAX_TEXT_CHARS {
            return Err(invalid(
                "reason",
                format!(
                    "say why the version is deprecated, in at most {} characters",
                    model::MAX_TEXT_CHARS
                ),
            ));
        }
        let form = self.form(form_id).await?;
        self.require_manager(caller, &form.owner, "deprecate versions of this form")?;
        self.version(form_id, VersionRef::Number(number)).await?;
        let key = RequestKey {
            caller: &caller.to_string(),
            request_id,
            method: METHOD,
        };
        match self
            .store
            .deprecate_version(form_id, number, reason, now, key)
            .await
        {
            Ok(()) => self.version(form_id, VersionRef::Number(number)).await,
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::Concurrent(form.name());
                let resource = self.raced(caller, request_id, METHOD, otherwise).await?;
                self.version_by_name(&resource).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One form.
    pub async fn form(&self, form_id: &str) -> Result<Form, FormsError> {
        self.store
            .form(form_id)
            .await?
            .ok_or_else(|| FormsError::NotFound(format!("forms/{form_id}")))
    }

    /// A page of forms.
    pub async fn forms(
        &self,
        after: Option<String>,
        owner: Option<&Member>,
        size: u32,
    ) -> Result<Page<Form>, FormsError> {
        let forms = self
            .store
            .forms(after.as_deref().unwrap_or(""), owner, size)
            .await?;
        let next = next_key(&forms, size, |f| f.id.clone());
        Ok((forms, next))
    }

    /// One version, or the newest active one.
    pub async fn version(
        &self,
        form_id: &str,
        which: VersionRef,
    ) -> Result<FormVersion, FormsError> {
        let found = match which {
            VersionRef::Number(n) => self.store.version(form_id, n).await?,
            VersionRef::Latest => self.store.latest_active_version(form_id).await?,
        };
        match (found, which) {
            (Some(version), _) => Ok(version),
            (None, VersionRef::Number(n)) => {
                // Say which is missing: the form or only the version.
                self.form(form_id).await?;
                Err(FormsError::NotFound(model::version_name(form_id, n)))
            }
            (None, VersionRef::Latest) => {
                self.form(form_id).await?;
                Err(FormsError::NotFound(format!(
                    "an active version of forms/{form_id}"
                )))
            }
        }
    }

    async fn version_by_name(&self, name: &str) -> Result<FormVersion, FormsError> {
        let (form_id, which) = model::parse_version_name(name)
            .map_err(|e| FormsError::Store(StoreError::Corrupt(e)))?;
        self.version(&form_id, which).await
    }

    /// A page of versions.
    pub async fn versions(
        &self,
        form_id: &str,
        after: Option<String>,
        size: u32,
    ) -> Result<Page<FormVersion>, FormsError> {
        let after = match after {
            Some(token) => token
                .parse::<u32>()
                .map_err(|_| invalid("page_token", "not a token this service issued".into()))?,
            None => 0,
        };
        self.form(form_id).await?;
        let mut versions = self.store.versions(form_id, after, size).await?;
        // Schemas may be large: a page ends early rather than outgrow a reply.
        let mut bytes = 0;
        if let Some(end) = versions.iter().position(|v| {
            bytes += v.schema_json.len();
            bytes > MAX_PAGE_BYTES
        }) {
            versions.truncate(end.max(1));
            let next = versions.last().map(|v| v.version.to_string());
            return Ok((versions, next));
        }
        let next = next_key(&versions, size, |v| v.version.to_string());
        Ok((versions, next))
    }

    /// Validates a JSON document against a version that accepts data.
    pub async fn validate(
        &self,
        form_id: &str,
        which: VersionRef,
        data_json: &str,
    ) -> Result<(Form, FormVersion), FormsError> {
        let document =
            schema::parse_json(data_json, schema::MAX_DOCUMENT_BYTES).map_err(|error| {
                FormsError::InvalidJson {
                    field: "data_json",
                    error,
                }
            })?;
        let version = self.version(form_id, which).await?;
        if let Some(deprecation) = &version.deprecation {
            let latest = self.store.latest_active_version(form_id).await?;
            return Err(FormsError::Deprecated {
                version: version.name(),
                reason: deprecation.reason.clone(),
                latest: latest.map(|v| v.version),
            });
        }
        let violations = self.compiled(&version)?.validate(&document);
        if !violations.is_empty() {
            return Err(FormsError::InvalidData {
                version: version.name(),
                violations,
            });
        }
        let form = self.form(form_id).await?;
        Ok((form, version))
    }

    /// The compiled schema of a version, compiling it on first use.
    pub fn compiled(&self, version: &FormVersion) -> Result<CompiledSchema, FormsError> {
        let key = (version.form_id.clone(), version.version);
        if let Some(compiled) = self.compiled.read().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(compiled);
        }
        let (_, compiled) = compile(&version.schema_json)?;
        self.remember(version, compiled.clone());
        Ok(compiled)
    }

    fn remember(&self, version: &FormVersion, compiled: CompiledSchema) {
        if let Ok(mut cache) = self.compiled.write() {
            // A crude bound: versions in use are few, and recompiling is cheap next to a leak.
            if cache.len() >= MAX_CACHED_SCHEMAS {
                cache.clear();
            }
            cache.insert((version.form_id.clone(), version.version), compiled);
        }
    }
}

/// Compiles a schema on a blocking thread: a large one takes milliseconds of CPU.
async fn compile_apart(schema_json: String) -> Result<(Value, CompiledSchema), FormsError> {
    tokio::task::spawn_blocking(move || compile(&schema_json))
        .await
        .map_err(|e| FormsError::Internal(format!("schema compilation: {e}")))?
}

fn compile(schema_json: &str) -> Result<(Value, CompiledSchema), FormsError> {
    let schema = schema::parse_json(schema_json, schema::MAX_SCHEMA_BYTES).map_err(|error| {
        FormsError::InvalidJson {
            field: "schema_json",
            error,
        }
    })?;
    let compiled = CompiledSchema::compile(&schema).map_err(FormsError::InvalidSchema)?;
    Ok((schema, compiled))
}

fn invalid_text(field: &str, text: &Localized, required: bool) -> Result<(), FormsError> {
    check_text(field, text, required).map_err(|m| invalid(field, m))
}

fn invalid_fields(fields: &[Field]) -> Result<(), FormsError> {
    check_fields(fields).map_err(|(field, m)| invalid(&field, m))
}

impl Registry {
    /// Creates a seed form unless a form with its id exists; run at start, as the platform.
    pub async fn seed(
        &self,
        trust_domain: &str,
        seed: crate::seed::SeedForm,
        now: OffsetDateTime,
    ) -> Result<(), FormsError> {
        if self.store.form(&seed.form_id).await?.is_some() {
            return Ok(());
        }
        let owner = Member::parse(&seed.owner).map_err(|e| invalid("owner", e.to_string()))?;
        // The owner creates its own form: the seed stands in for the institution.
        let caller = SpiffeId::member(trust_domain, owner.clone());
        let new = NewForm {
            id: seed.form_id.clone(),
            owner,
            title: seed.title,
            description: seed.description,
            schema_json: seed.schema.to_string(),
            fields: seed.fields,
        };
        self.create(&caller, &format!("seed:{}", seed.form_id), new, now)
            .await
            .map(|_| ())
    }
}
