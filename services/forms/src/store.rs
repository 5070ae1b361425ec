//! Where forms live: portable SQL over the `Any` driver, the same statements on SQLite and
//! PostgreSQL. Every mutation is one transaction that also records its request (the platform's
//! `requests`), so that a retried request finds the first result and nothing happens twice.

use onestop_platform::db::{Database, Migrations, conflict_on_duplicate, from_millis, millis};
use onestop_platform::identity::Member;
use onestop_platform::requests::{self, Request};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use time::OffsetDateTime;

pub use onestop_platform::db::StoreError;

use crate::model::{Deprecation, Field, Form, FormVersion, Localized};

/// The embedded migrations. Their SQL is portable, so both backends share one directory; a
/// change that needs each dialect's own SQL gets a directory per backend.
pub static MIGRATIONS: Migrations = Migrations {
    sqlite: &PORTABLE,
    postgres: &PORTABLE,
};
static PORTABLE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The forms store.
#[derive(Clone, Debug)]
pub struct Store {
    db: Database,
}

/// The columns of `forms`, as a literal so that every statement stays a literal.
macro_rules! form_columns {
    () => {
        "form_id, owner_class, owner_code, title_lv, title_en, description_lv, description_en, \
         latest_version, create_time_ms, update_time_ms"
    };
}

/// The columns of `form_versions`.
macro_rules! version_columns {
    () => {
        "form_id, version, schema_json, fields_json, breaking, deprecation_reason, \
         deprecate_time_ms, create_time_ms"
    };
}

impl Store {
    /// Wraps an opened database.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Creates a form with its first version.
    pub async fn create_form(
        &self,
        form: &Form,
        version: &FormVersion,
        request: &Request,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        requests::record(&mut tx, request, &version.name(), form.create_time).await?;
        let insert = sqlx::query(concat!(
            "INSERT INTO forms (",
            form_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&form.id)
        .bind(&form.owner.class)
        .bind(&form.owner.code)
        .bind(&form.title.lv)
        .bind(&form.title.en)
        .bind(&form.description.lv)
        .bind(&form.description.en)
        .bind(i64::from(form.latest_version))
        .bind(millis(form.create_time))
        .bind(millis(form.update_time))
        .execute(&mut *tx)
        .await;
        conflict_on_duplicate(insert)?;
        insert_version(&mut tx, version).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds a version after `previous`, failing with [`StoreError::Conflict`] when another
    /// version was published meanwhile. A new title, when given, replaces the form's.
    pub async fn publish_version(
        &self,
        version: &FormVersion,
        previous: u32,
        title: Option<&Localized>,
        request: &Request,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        requests::record(&mut tx, request, &version.name(), version.create_time).await?;
        let updated = sqlx::query(
            "UPDATE forms SET latest_version = $1, update_time_ms = $2, \
             title_lv = COALESCE($3, title_lv), title_en = COALESCE($4, title_en) \
             WHERE form_id = $5 AND latest_version = $6",
        )
        .bind(i64::from(version.version))
        .bind(millis(version.create_time))
        .bind(title.map(|t| t.lv.clone()))
        .bind(title.map(|t| t.en.clone()))
        .bind(&version.form_id)
        .bind(i64::from(previous))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        insert_version(&mut tx, version).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks a version deprecated; deprecating it again keeps the first reason and time.
    pub async fn deprecate_version(
        &self,
        form_id: &str,
        version: u32,
        reason: &str,
        now: OffsetDateTime,
        request: &Request,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.pool.begin().await?;
        requests::record(
            &mut tx,
            request,
            &crate::model::version_name(form_id, version),
            now,
        )
        .await?;
        sqlx::query(
            "UPDATE form_versions SET deprecation_reason = $1, deprecate_time_ms = $2 \
             WHERE form_id = $3 AND version = $4 AND deprecate_time_ms IS NULL",
        )
        .bind(reason)
        .bind(millis(now))
        .bind(form_id)
        .bind(i64::from(version))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE forms SET update_time_ms = $1 WHERE form_id = $2")
            .bind(millis(now))
            .bind(form_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One form.
    pub async fn form(&self, form_id: &str) -> Result<Option<Form>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            form_columns!(),
            " FROM forms WHERE form_id = $1"
        ))
        .bind(form_id)
        .fetch_optional(&self.db.pool)
        .await?
        .map(|row| form_from_row(&row))
        .transpose()
    }

    /// Forms in id order after `after`, optionally of one owner.
    pub async fn forms(
        &self,
        after: &str,
        owner: Option<&Member>,
        limit: u32,
    ) -> Result<Vec<Form>, StoreError> {
        let rows = match owner {
            Some(owner) => {
                sqlx::query(concat!(
                    "SELECT ",
                    form_columns!(),
                    " FROM forms WHERE form_id > $1 \
                     AND owner_class = $2 AND owner_code = $3 ORDER BY form_id LIMIT $4"
                ))
                .bind(after)
                .bind(&owner.class)
                .bind(&owner.code)
                .bind(i64::from(limit))
                .fetch_all(&self.db.pool)
                .await?
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    form_columns!(),
                    " FROM forms WHERE form_id > $1 ORDER BY form_id LIMIT $2"
                ))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.db.pool)
                .await?
            }
        };
        rows.iter().map(form_from_row).collect()
    }

    /// One version.
    pub async fn version(
        &self,
        form_id: &str,
        version: u32,
    ) -> Result<Option<FormVersion>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM form_versions WHERE form_id = $1 AND version = $2"
        ))
        .bind(form_id)
        .bind(i64::from(version))
        .fetch_optional(&self.db.pool)
        .await?
        .map(|row| version_from_row(&row))
        .transpose()
    }

    /// The newest version that is not deprecated.
    pub async fn latest_active_version(
        &self,
        form_id: &str,
    ) -> Result<Option<FormVersion>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM form_versions WHERE form_id = $1 \
             AND deprecate_time_ms IS NULL ORDER BY version DESC LIMIT 1"
        ))
        .bind(form_id)
        .fetch_optional(&self.db.pool)
        .await?
        .map(|row| version_from_row(&row))
        .transpose()
    }

    /// Versions in order after `after`.
    pub async fn versions(
        &self,
        form_id: &str,
        after: u32,
        limit: u32,
    ) -> Result<Vec<FormVersion>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            version_columns!(),
            " FROM form_versions WHERE form_id = $1 AND version > $2 \
             ORDER BY version LIMIT $3"
        ))
        .bind(form_id)
        .bind(i64::from(after))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }
}

async fn insert_version(
    tx: &mut Transaction<'_, Any>,
    version: &FormVersion,
) -> Result<(), StoreError> {
    let fields = serde_json::to_string(&version.fields)
        .map_err(|e| StoreError::Corrupt(format!("fields do not encode: {e}")))?;
    let insert = sqlx::query(concat!(
        "INSERT INTO form_versions (",
        version_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    ))
    .bind(&version.form_id)
    .bind(i64::from(version.version))
    .bind(&version.schema_json)
    .bind(fields)
    .bind(i64::from(version.breaking))
    .bind(version.deprecation.as_ref().map(|d| d.reason.clone()))
    .bind(version.deprecation.as_ref().map(|d| millis(d.time)))
    .bind(millis(version.create_time))
    .execute(&mut **tx)
    .await;
    conflict_on_duplicate(insert)
}

fn number(value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("version {value}")))
}

fn form_from_row(row: &AnyRow) -> Result<Form, StoreError> {
    Ok(Form {
        id: row.try_get("form_id")?,
        owner: Member {
            class: row.try_get("owner_class")?,
            code: row.try_get("owner_code")?,
            subsystem: String::new(),
        },
        title: Localized {
            lv: row.try_get("title_lv")?,
            en: row.try_get("title_en")?,
        },
        description: Localized {
            lv: row.try_get("description_lv")?,
            en: row.try_get("description_en")?,
        },
        latest_version: number(row.try_get("latest_version")?)?,
        create_time: from_millis(row.try_get("create_time_ms")?)?,
        update_time: from_millis(row.try_get("update_time_ms")?)?,
    })
}

fn version_from_row(row: &AnyRow) -> Result<FormVersion, StoreError> {
    let fields: String = row.try_get("fields_json")?;
    let fields: Vec<Field> =
        serde_json::from_str(&fields).map_err(|e| StoreError::Corrupt(format!("fields: {e}")))?;
    let deprecate_time: Option<i64> = row.try_get("deprecate_time_ms")?;
    let deprecation = match deprecate_time {
        Some(ms) => Some(Deprecation {
            reason: row
                .try_get::<Option<String>, _>("deprecation_reason")?
                .unwrap_or_default(),
            time: from_millis(ms)?,
        }),
        None => None,
    };
    Ok(FormVersion {
        form_id: row.try_get("form_id")?,
        version: number(row.try_get("version")?)?,
        schema_json: row.try_get("schema_json")?,
        fields,
        breaking: row.try_get::<i64, _>("breaking")? != 0,
        deprecation,
        create_time: from_millis(row.try_get("create_time_ms")?)?,
    })
}
