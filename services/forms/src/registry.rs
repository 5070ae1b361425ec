//! The use cases of the e-forms service: creating forms, publishing and deprecating versions,
//! reading them, and validating data. Who may do what is decided here; the store only keeps.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use onestop_platform::identity::{Member, Principal, SpiffeId};
use onestop_platform::paging::{PageTokens, Query};
use onestop_platform::requests::{Fingerprint, Request, Requests};
use serde_json::Value;
use time::OffsetDateTime;

use crate::compat::{self, Narrowing};
use crate::error::FormsError;
use crate::model::{
    self, Deprecation, Field, Form, FormVersion, Localized, VersionRef, check_fields,
    check_form_id, check_text,
};
use crate::schema::{self, CompiledSchema};
use crate::store::{Store, StoreError};

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

/// The method name under which seeding is recorded.
pub const SEED_METHOD: &str = "CreateForm";

fn invalid(field: &str, message: String) -> FormsError {
    FormsError::InvalidField {
        field: field.to_owned(),
        message,
    }
}

/// A page of results and the token of the next page, if there is one.
pub type Page<T> = (Vec<T>, Option<String>);

/// What the page tokens of `ListForms` are bound to: the owner filter, by institution (the
/// only part of it that chooses forms).
fn forms_query(owner: Option<&Member>) -> Query {
    let owner = owner
        .map(|o| o.institution().to_string())
        .unwrap_or_default();
    Query::new("ListForms").with("owner", &owner)
}

/// What the page tokens of `ListFormVersions` are bound to: the form.
fn versions_query(form_id: &str) -> Query {
    Query::new("ListFormVersions").with("parent", form_id)
}

/// Forms and their versions, with compiled schemas cached per version.
pub struct Registry {
    store: Store,
    requests: Requests,
    operators: Vec<Member>,
    tokens: PageTokens,
    /// Versions validated against, by what the caller named (a number or `latest`), at most
    /// [`MAX_CACHED_SCHEMAS`].
    validators: RwLock<HashMap<(String, VersionRef), Arc<Validator>>>,
    /// How long a validator is used before it is read again ([`VALIDATOR_STALENESS`]).
    staleness: Duration,
}

impl Registry {
    /// A registry over a store; members of the `operators` institutions may manage every form.
    /// Page tokens are signed with the secret the store keeps (made on the first start), so
    /// that every replica and every restart accepts them.
    pub async fn open(
        store: Store,
        requests: Requests,
        operators: Vec<Member>,
    ) -> Result<Self, FormsError> {
        let tokens = PageTokens::open(store.database()).await?;
        Ok(Self {
            store,
            requests,
            operators,
            tokens,
            validators: RwLock::new(HashMap::new()),
            staleness: VALIDATOR_STALENESS,
        })
    }

    /// The key after which the page a token asks for starts.
    fn resume(&self, query: &Query, page_token: &str) -> Result<Option<String>, FormsError> {
        self.tokens
            .resume(query, page_token)
            .map_err(|m| invalid("page_token", m))
    }

    /// Ends a page of at most `size` items, fetched with one item more to tell whether another
    /// page follows, and issues the token of that page.
    fn page<T>(
        &self,
        query: &Query,
        mut items: Vec<T>,
        size: usize,
        key: impl Fn(&T) -> String,
    ) -> Page<T> {
        let more = items.len() > size;
        items.truncate(size);
        let next = more
            .then(|| {
                items
                    .last()
                    .map(|last| self.tokens.issue(query, &key(last)))
            })
            .flatten();
        (items, next)
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

    /// The database the registry keeps its forms in.
    pub fn database(&self) -> &onestop_platform::db::Database {
        self.store.database()
    }

    /// The record of requests that changed something.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// After a write refused as conflicting: the resource this very request recorded meanwhile
    /// (a retry that raced the first attempt), or else `otherwise` (the conflict was another
    /// request's). A request id used for another request is reported as such.
    async fn raced(&self, request: &Request, otherwise: FormsError) -> Result<String, FormsError> {
        self.requests.earlier(request).await?.ok_or(otherwise)
    }

    /// Creates a form and its first version.
    pub async fn create(
        &self,
        caller: &SpiffeId,
        request: &Request,
        new: NewForm,
        now: OffsetDateTime,
    ) -> Result<(Form, FormVersion), FormsError> {
        if let Some(resource) = self.requests.earlier(request).await? {
            return self.form_and_version(&resource).await;
        }
        check_form_id(&new.id).map_err(|m| invalid("form_id", m))?;
        let owner = new.owner.institution();
        self.require_manager(caller, &owner, "create a form for this owner")?;
        invalid_text("title", &new.title, true)?;
        invalid_text("description", &new.description, false)?;
        invalid_fields(&new.fields)?;
        // Compiling proves the schema usable; it is cached when data is first validated.
        compile_new_apart(new.schema_json.clone()).await?;
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
        match self.store.create_form(&form, &version, request).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::AlreadyExists(form.name());
                let resource = self.raced(request, otherwise).await?;
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
        request: &Request,
        form_id: &str,
        new: NewVersion,
        now: OffsetDateTime,
    ) -> Result<FormVersion, FormsError> {
        if let Some(resource) = self.requests.earlier(request).await? {
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
        let (schema, _) = compile_new_apart(new.schema_json.clone()).await?;
        let previous = self
            .version(form_id, VersionRef::Number(form.latest_version))
            .await?;
        if !new.breaking {
            let old = schema::parse_json(&previous.schema_json, usize::MAX).map_err(|error| {
                FormsError::Store(StoreError::Corrupt(format!("stored schema: {error}")))
            })?;
            let narrowings = check_apart(move || compat::narrowings(&old, &schema)).await?;
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
        match self
            .store
            .publish_version(&version, form.latest_version, new.title.as_ref(), request)
            .await
        {
            // This replica sees its own change at once; the others within the staleness.
            Ok(()) => self.forget(form_id),
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::Concurrent(form.name());
                let resource = self.raced(request, otherwise).await?;
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
        request: &Request,
        form_id: &str,
        number: u32,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<FormVersion, FormsError> {
        if let Some(resource) = self.requests.earlier(request).await? {
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
        match self
            .store
            .deprecate_version(form_id, number, reason, now, request)
            .await
        {
            Ok(()) => {
                self.forget(form_id);
                self.version(form_id, VersionRef::Number(number)).await
            }
            Err(StoreError::Conflict) => {
                let otherwise = FormsError::Concurrent(form.name());
                let resource = self.raced(request, otherwise).await?;
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

    /// A page of forms, after the one `page_token` names (the first page when it is empty).
    pub async fn forms(
        &self,
        page_token: &str,
        owner: Option<&Member>,
        size: u32,
    ) -> Result<Page<Form>, FormsError> {
        let query = forms_query(owner);
        let after = self.resume(&query, page_token)?;
        let forms = self
            .store
            .forms(
                after.as_deref().unwrap_or(""),
                owner,
                size.saturating_add(1),
            )
            .await?;
        Ok(self.page(&query, forms, size as usize, |f| f.id.clone()))
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

    /// A page of versions, after the one `page_token` names (the first page when it is empty).
    pub async fn versions(
        &self,
        form_id: &str,
        page_token: &str,
        size: u32,
    ) -> Result<Page<FormVersion>, FormsError> {
        let query = versions_query(form_id);
        let after = match self.resume(&query, page_token)? {
            // The token is ours, so its key is a version number; anything else is a bug.
            Some(key) => key.parse::<u32>().map_err(|_| {
                FormsError::Internal(format!("a page token of {form_id} carries `{key}`"))
            })?,
            None => 0,
        };
        self.form(form_id).await?;
        let versions = self
            .store
            .versions(form_id, after, size.saturating_add(1))
            .await?;
        // Schemas may be large: a page ends early rather than outgrow a reply, and always
        // holds at least one version so that paging moves on.
        let mut bytes = 0;
        let fits = versions
            .iter()
            .position(|v| {
                bytes += v.schema_json.len();
                bytes > MAX_PAGE_BYTES
            })
            .map_or(size as usize, |end| end.max(1));
        Ok(self.page(&query, versions, fits.min(size as usize), |v| {
            v.version.to_string()
        }))
    }

    /// Validates a JSON document against a version that accepts data, and names the version
    /// and the form's title. The version is read from memory (see [`Validator`]); a large
    /// document is parsed and checked on a blocking thread, off the threads that serve calls.
    #[tracing::instrument(
        name = "forms.validate",
        skip_all,
        fields(onestop.component = "forms", form_id = form_id, bytes = data_json.len())
    )]
    pub async fn validate(
        &self,
        form_id: &str,
        which: VersionRef,
        data_json: &str,
    ) -> Result<Arc<Validator>, FormsError> {
        let validator = self.validator(form_id, which).await?;
        if let Some(deprecation) = &validator.deprecation {
            let latest = self.store.latest_active_version(form_id).await?;
            return Err(FormsError::Deprecated {
                version: validator.version.clone(),
                reason: deprecation.reason.clone(),
                latest: latest.map(|v| v.version),
            });
        }
        let check = |data_json: &str, compiled: &CompiledSchema| {
            let document =
                schema::parse_json(data_json, schema::MAX_DOCUMENT_BYTES).map_err(|error| {
                    FormsError::InvalidJson {
                        field: "data_json",
                        error,
                    }
                })?;
            let mut violations = compiled.validate(&document);
            // Whatever the schema allows, no string holds a control character (other than tab
            // and line breaks): the platform's rule for every text.
            violations.extend(
                onestop_platform::text::json_control_characters(&document)
                    .into_iter()
                    .map(schema::control_character),
            );
            violations.sort_by(|a, b| a.pointer.cmp(&b.pointer));
            violations.truncate(schema::MAX_VIOLATIONS);
            Ok::<_, FormsError>(violations)
        };
        let violations = if data_json.len() <= HEAVY_DOCUMENT_BYTES {
            check(data_json, &validator.compiled)?
        } else {
            let (data_json, compiled) = (data_json.to_owned(), validator.compiled.clone());
            tokio::task::spawn_blocking(move || check(&data_json, &compiled))
                .await
                .map_err(|e| FormsError::Internal(format!("validation: {e}")))??
        };
        if !violations.is_empty() {
            return Err(FormsError::InvalidData {
                version: validator.version.clone(),
                violations,
            });
        }
        Ok(validator)
    }

    /// What validating against a version needs, from memory when it was read less than
    /// [`VALIDATOR_STALENESS`] ago, from the store otherwise (compiling the schema on a blocking
    /// thread when it is not compiled yet).
    async fn validator(
        &self,
        form_id: &str,
        which: VersionRef,
    ) -> Result<Arc<Validator>, FormsError> {
        let key = (form_id.to_owned(), which);
        let cached = self
            .validators
            .read()
            .ok()
            .and_then(|cache| cache.get(&key).cloned());
        if let Some(validator) = cached.filter(|v| v.read.elapsed() < self.staleness) {
            return Ok(validator);
        }
        let version = self.version(form_id, which).await?;
        let form = self.form(form_id).await?;
        let compiled_key = (version.form_id.clone(), version.version);
        let compiled = self.validators.read().ok().and_then(|cache| {
            cache
                .values()
                .find(|v| v.key == compiled_key)
                .map(|v| v.compiled.clone())
        });
        let compiled = match compiled {
            Some(compiled) => compiled,
            None => {
                let schema_json = version.schema_json.clone();
                tokio::task::spawn_blocking(move || compile(&schema_json))
                    .await
                    .map_err(|e| FormsError::Internal(format!("compiling a schema: {e}")))??
                    .1
            }
        };
        let validator = Arc::new(Validator {
            key: compiled_key,
            version: version.name(),
            title: form.title,
            deprecation: version.deprecation,
            compiled,
            read: Instant::now(),
        });
        if let Ok(mut cache) = self.validators.write() {
            // A crude bound: versions in use are few, and reading them again is cheap next to
            // a leak.
            if cache.len() >= MAX_CACHED_SCHEMAS {
                cache.clear();
            }
            cache.insert(key, validator.clone());
        }
        Ok(validator)
    }
}

impl Registry {
    /// Drops what validation keeps of a form, after this replica changed it.
    fn forget(&self, form_id: &str) {
        if let Ok(mut cache) = self.validators.write() {
            cache.retain(|(form, _), _| form != form_id);
        }
    }
}

/// How long a version read for validation is used before it is read again. Published versions
/// never change, but which version is the latest and whether one is deprecated do: every
/// replica sees such a change within this time, whichever replica made it.
pub const VALIDATOR_STALENESS: Duration = Duration::from_secs(2);

/// Documents larger than this are parsed and validated on a blocking thread.
const HEAVY_DOCUMENT_BYTES: usize = 64 * 1024;

/// A version as validation needs it, kept in memory.
#[derive(Debug)]
pub struct Validator {
    /// The form and version number it is.
    key: (String, u32),
    /// The version's name, `forms/{form}/versions/{n}`.
    pub version: String,
    /// The form's title.
    pub title: Localized,
    /// Set once the version is deprecated (as of when it was read).
    deprecation: Option<Deprecation>,
    compiled: CompiledSchema,
    /// When it was read from the store.
    read: Instant,
}

impl Validator {
    /// The JSON Pointers of the data's subject fields (see [`schema::subject_fields`]).
    pub fn subject_fields(&self) -> &[String] {
        self.compiled.subject_fields()
    }
}

/// Compiles a submitted schema on a blocking thread: a large one takes milliseconds of CPU.
async fn compile_new_apart(schema_json: String) -> Result<(Value, CompiledSchema), FormsError> {
    tokio::task::spawn_blocking(move || compile_with(&schema_json, CompiledSchema::compile_new))
        .await
        .map_err(|e| FormsError::Internal(format!("schema compilation: {e}")))?
}

/// Runs the breaking-change check on a blocking thread: comparing large schemas is CPU work
/// that must not hold the threads serving calls. A check that panics is a fault of the check,
/// reported as such.
async fn check_apart(
    check: impl FnOnce() -> Vec<Narrowing> + Send + 'static,
) -> Result<Vec<Narrowing>, FormsError> {
    tokio::task::spawn_blocking(check)
        .await
        .map_err(|e| FormsError::CompatibilityCheck(e.to_string()))
}

/// Compiles the schema of a stored version.
fn compile(schema_json: &str) -> Result<(Value, CompiledSchema), FormsError> {
    compile_with(schema_json, CompiledSchema::compile)
}

fn compile_with(
    schema_json: &str,
    compile: fn(&Value) -> Result<CompiledSchema, schema::Violation>,
) -> Result<(Value, CompiledSchema), FormsError> {
    let schema = schema::parse_json(schema_json, schema::MAX_SCHEMA_BYTES).map_err(|error| {
        FormsError::InvalidJson {
            field: "schema_json",
            error,
        }
    })?;
    let compiled = compile(&schema).map_err(FormsError::InvalidSchema)?;
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
        // Replicas starting together seed with the same request, so that one of them creates
        // the form and the others find it.
        let fingerprint = Fingerprint::of_bytes(new.schema_json.as_bytes());
        let request = Request::new(
            &caller,
            &format!("seed:{}", seed.form_id),
            SEED_METHOD,
            fingerprint,
        )?;
        self.create(&caller, &request, new, now).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use onestop_platform::config::DatabaseConfig;
    use serde_json::json;
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;

    async fn open_on(file: &Path) -> Registry {
        let config = DatabaseConfig::at(format!("sqlite://{}", file.display()));
        let db = onestop_platform::db::open(&config, &crate::store::MIGRATIONS)
            .await
            .unwrap();
        let requests = Requests::new(&db, config.request_retention());
        Registry::open(Store::new(db), requests, Vec::new())
            .await
            .unwrap()
    }

    /// A request by the demo institution, its fingerprint made of its id.
    fn request(method: &'static str, id: &str) -> Request {
        Request::new(&vsaa(), id, method, Fingerprint::of_bytes(id.as_bytes())).unwrap()
    }

    fn vsaa() -> SpiffeId {
        SpiffeId::member("onestop.lv", Member::parse("GOV/VSAA/pensions").unwrap())
    }

    fn text(en: &str) -> Localized {
        Localized {
            lv: en.to_owned(),
            en: en.to_owned(),
        }
    }

    async fn create(registry: &Registry, id: &str, schema: &Value) -> Result<(), FormsError> {
        let new = NewForm {
            id: id.to_owned(),
            owner: Member::parse("GOV/VSAA").unwrap(),
            title: text("A form"),
            description: Localized::default(),
            schema_json: schema.to_string(),
            fields: Vec::new(),
        };
        registry
            .create(
                &vsaa(),
                &request("CreateForm", &format!("create-{id}")),
                new,
                OffsetDateTime::now_utc(),
            )
            .await
            .map(|_| ())
    }

    async fn publish(registry: &Registry, id: &str, n: u32) {
        let new = NewVersion {
            schema_json: json!({"type": "object", "title": format!("v{n}")}).to_string(),
            fields: Vec::new(),
            breaking: false,
            title: None,
        };
        registry
            .publish(
                &vsaa(),
                &request("PublishFormVersion", &format!("publish-{id}-{n}")),
                id,
                new,
                OffsetDateTime::now_utc(),
            )
            .await
            .unwrap();
    }

    /// Every id on every page, and how many pages there were.
    async fn all_forms(registry: &Registry, size: u32) -> (Vec<String>, usize) {
        let (mut ids, mut pages, mut token) = (Vec::new(), 0, String::new());
        loop {
            let (forms, next) = registry.forms(&token, None, size).await.unwrap();
            pages += 1;
            ids.extend(forms.into_iter().map(|f| f.id));
            match next {
                Some(next) => token = next,
                None => return (ids, pages),
            }
        }
    }

    fn field_of(error: FormsError) -> String {
        match error {
            FormsError::InvalidField { field, .. } => field,
            other => panic!("not an invalid field: {other:?}"),
        }
    }

    async fn latest(registry: &Registry) -> Result<Arc<Validator>, FormsError> {
        registry.validate("form-s", VersionRef::Latest, "{}").await
    }

    #[tokio::test]
    async fn another_replicas_change_is_seen_within_the_staleness_bound() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("forms.db");
        let mut a = open_on(&file).await;
        let b = open_on(&file).await;
        create(&b, "form-s", &json!({"type": "object"}))
            .await
            .unwrap();
        assert_eq!(latest(&a).await.unwrap().version, "forms/form-s/versions/1");
        publish(&b, "form-s", 2).await;
        // Within the bound a replica may answer from what it read ...
        assert_eq!(latest(&a).await.unwrap().version, "forms/form-s/versions/1");
        // ... and past it, it reads again.
        a.staleness = Duration::ZERO;
        assert_eq!(latest(&a).await.unwrap().version, "forms/form-s/versions/2");
        // The replica that makes a change sees it at once.
        assert_eq!(latest(&b).await.unwrap().version, "forms/form-s/versions/2");
        b.deprecate(
            &vsaa(),
            &request("DeprecateFormVersion", "dep-2"),
            "form-s",
            2,
            "replaced",
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        let refused = b
            .validate("form-s", VersionRef::Number(2), "{}")
            .await
            .unwrap_err();
        assert!(
            matches!(refused, FormsError::Deprecated { .. }),
            "{refused:?}"
        );
        assert_eq!(latest(&b).await.unwrap().version, "forms/form-s/versions/1");
    }

    #[tokio::test]
    async fn the_last_page_carries_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let registry = open_on(&dir.path().join("forms.db")).await;
        for id in ["form-a", "form-b", "form-c", "form-d"] {
            create(&registry, id, &json!({"type": "object"}))
                .await
                .unwrap();
        }
        let every = ["form-a", "form-b", "form-c", "form-d"];
        // A full last page, a short one, a page larger than the list.
        assert_eq!(
            all_forms(&registry, 2).await,
            (every.map(String::from).into(), 2)
        );
        assert_eq!(
            all_forms(&registry, 3).await,
            (every.map(String::from).into(), 2)
        );
        assert_eq!(
            all_forms(&registry, 4).await,
            (every.map(String::from).into(), 1)
        );
        assert_eq!(
            all_forms(&registry, 50).await,
            (every.map(String::from).into(), 1)
        );

        for n in 2..=4 {
            publish(&registry, "form-a", n).await;
        }
        let (first, next) = registry.versions("form-a", "", 2).await.unwrap();
        assert_eq!(first.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
        let (last, next) = registry
            .versions("form-a", &next.unwrap(), 2)
            .await
            .unwrap();
        assert_eq!(last.iter().map(|v| v.version).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn page_tokens_are_bound_to_their_query_and_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("forms.db");
        let registry = open_on(&file).await;
        for id in ["form-a", "form-b", "form-c"] {
            create(&registry, id, &json!({"type": "object"}))
                .await
                .unwrap();
        }
        publish(&registry, "form-a", 2).await;
        let (_, token) = registry.forms("", None, 1).await.unwrap();
        let token = token.unwrap();

        // Another filter, another method, another form's versions: refused.
        let vsaa = Member::parse("GOV/VSAA").unwrap();
        let error = registry.forms(&token, Some(&vsaa), 1).await.unwrap_err();
        assert_eq!(field_of(error), "page_token");
        let error = registry.versions("form-a", &token, 1).await.unwrap_err();
        assert_eq!(field_of(error), "page_token");
        let (_, a_token) = registry.versions("form-a", "", 1).await.unwrap();
        let error = registry
            .versions("form-b", &a_token.unwrap(), 1)
            .await
            .unwrap_err();
        assert_eq!(field_of(error), "page_token");
        let status = tonic::Status::from(registry.forms("Zm9ybS1h", None, 1).await.unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);

        // A restarted process, or another replica on the same database, reads the token.
        let replica = open_on(&file).await;
        let (forms, _) = replica.forms(&token, None, 1).await.unwrap();
        assert_eq!(forms[0].id, "form-b");
        // Another database (another installation) does not.
        let elsewhere = open_on(&dir.path().join("other.db")).await;
        let error = elsewhere.forms(&token, None, 1).await.unwrap_err();
        assert_eq!(field_of(error), "page_token");
    }

    #[tokio::test]
    async fn unknown_formats_are_refused_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let registry = open_on(&dir.path().join("forms.db")).await;
        let typo = json!({"type": "object", "properties": {"mail": {"format": "emial"}}});
        let status = tonic::Status::from(create(&registry, "typo", &typo).await.unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        let violation = status.get_details_bad_request().unwrap().field_violations[0].clone();
        assert_eq!(violation.field, "schema_json/properties/mail/format");
        assert_eq!(violation.reason, "UNKNOWN_FORMAT");

        let known = json!({"type": "object", "properties": {
            "mail": {"format": "idn-email"},
            "code": {"format": "lv-personal-code"}
        }});
        create(&registry, "known", &known).await.unwrap();
    }

    #[tokio::test]
    async fn a_comparison_that_panics_is_reported_as_a_failed_check() {
        let error = check_apart(|| panic!("a bug in the comparison"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, FormsError::CompatibilityCheck(_)),
            "{error:?}"
        );
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), Code::Internal);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "COMPATIBILITY_CHECK_FAILED");
    }
}
