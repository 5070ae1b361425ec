//! The service catalogue: services (with their form versions, minimum level of assurance,
//! channels and routes), centres and destinations, and the routing decision itself.
//!
//! Entries are small and read on every submission, so the whole catalogue is held in memory
//! as one immutable snapshot, replaced when an operator changes an entry.

use std::collections::BTreeMap;

use onestop_platform::identity::Member;
use onestop_platform::person::Level;
use serde::{Deserialize, Serialize};

use crate::model::Channel;

/// Most routes of one service.
pub const MAX_ROUTES: usize = 500;
/// Most municipalities one route names.
pub const MAX_ROUTE_MUNICIPALITIES: usize = 200;
/// Most form versions one service accepts.
pub const MAX_FORM_VERSIONS: usize = 50;
/// Most services one centre offers.
pub const MAX_CENTRE_SERVICES: usize = 5_000;
/// Most entries of each kind.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest title, address or name, in characters.
pub const MAX_TEXT_CHARS: usize = 500;

/// A destination: an institution's subsystem with an inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// `CLASS/CODE/subsystem`.
    pub member: String,
    /// Latvian title.
    #[serde(default)]
    pub title_lv: String,
    /// English title.
    #[serde(default)]
    pub title_en: String,
}

/// Where a service's applications go for some municipalities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Municipality codes.
    pub municipalities: Vec<String>,
    /// The destination, `CLASS/CODE/subsystem`.
    pub destination: String,
}

/// A service of the catalogue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Its id.
    pub id: String,
    /// Latvian title.
    pub title_lv: String,
    /// English title.
    pub title_en: String,
    /// The owning institution, `CLASS/CODE`.
    pub institution: String,
    /// The e-form.
    pub form_id: String,
    /// The form versions accepted.
    pub form_versions: Vec<String>,
    /// The lowest level of assurance of the person filing (the resident online, the clerk at a
    /// centre).
    pub minimum_level: Level,
    /// The channels allowed.
    pub channels: Vec<Channel>,
    /// Where applications go when no route names the municipality.
    pub default_destination: String,
    /// Routes by territory, first match wins.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

impl Service {
    /// The destination of an application from `municipality` (empty: unknown).
    pub fn route(&self, municipality: &str) -> &str {
        self.routes
            .iter()
            .find(|route| route.municipalities.iter().any(|m| m == municipality))
            .map_or(self.default_destination.as_str(), |route| {
                route.destination.as_str()
            })
    }
}

/// A centre's tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// In a municipality's administrative centre.
    Regional,
    /// A parish or library.
    Local,
}

/// A service centre.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Centre {
    /// Its id, as staff tokens name it.
    pub id: String,
    /// The municipality running it, `MUN/<CODE>`.
    pub municipality: String,
    /// The municipality's name.
    pub municipality_name: String,
    /// The address.
    #[serde(default)]
    pub address: String,
    /// Regional or local.
    pub tier: Tier,
    /// The services it accepts applications for.
    #[serde(default)]
    pub services: Vec<String>,
}

/// A catalogue file: `[[destination]]`, `[[service]]` (with `[[service.route]]`) and
/// `[[centre]]` entries.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueFile {
    /// Destinations.
    #[serde(default)]
    pub destination: Vec<Destination>,
    /// Services.
    #[serde(default)]
    pub service: Vec<Service>,
    /// Centres.
    #[serde(default)]
    pub centre: Vec<Centre>,
}

/// The catalogue every installation starts with: the five seed forms' services, the
/// institutions' destinations and the regional centres.
pub const SEED: &str = include_str!("../seed/catalogue.toml");

impl CatalogueFile {
    /// Parses a catalogue file and checks every entry against the others.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: CatalogueFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Catalogue::of(file.clone())?;
        Ok(file)
    }
}

/// Why an entry cannot be put into the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// A field is malformed: the field and why.
    Invalid(Vec<(String, String)>),
    /// It names an entry that does not exist.
    Missing(String),
}

impl EntryError {
    /// One line saying what is wrong.
    pub fn describe(&self) -> String {
        match self {
            EntryError::Invalid(violations) => violations
                .iter()
                .map(|(field, why)| format!("{field}: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
            EntryError::Missing(what) => what.clone(),
        }
    }
}

/// The whole catalogue, as one consistent snapshot.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    /// Services by id.
    pub services: BTreeMap<String, Service>,
    /// Centres by id.
    pub centres: BTreeMap<String, Centre>,
    /// Destinations by member.
    pub destinations: BTreeMap<String, Destination>,
}

/// Whether `id` is a catalogue id: lower-case letters, digits and `-`, 1 to `max` long.
pub fn is_id(id: &str, max: usize) -> bool {
    !id.is_empty()
        && id.len() <= max
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn text(violations: &mut Vec<(String, String)>, field: &str, value: &str, required: bool) {
    if required && value.trim().is_empty() {
        violations.push((field.into(), "is required".into()));
    } else if value.chars().count() > MAX_TEXT_CHARS {
        violations.push((
            field.into(),
            format!("is longer than {MAX_TEXT_CHARS} characters"),
        ));
    } else if let Err(why) = onestop_platform::text::check(value) {
        violations.push((field.into(), why.into()));
    }
}

fn member(violations: &mut Vec<(String, String)>, field: &str, value: &str, subsystem: bool) {
    match Member::parse(value) {
        Ok(m) if subsystem && m.subsystem.is_empty() => violations.push((
            field.into(),
            "must name a subsystem (CLASS/CODE/subsystem)".into(),
        )),
        Ok(m) if !subsystem && !m.subsystem.is_empty() => {
            violations.push((field.into(), "must name an institution (CLASS/CODE)".into()))
        }
        Ok(_) => {}
        Err(e) => violations.push((field.into(), e.to_string())),
    }
}

impl Catalogue {
    /// The catalogue of these entries, checked.
    pub fn of(file: CatalogueFile) -> Result<Self, String> {
        let mut catalogue = Catalogue::default();
        for d in file.destination {
            let member = d.member.clone();
            catalogue
                .put_destination(d)
                .map_err(|e| format!("destination `{member}`: {}", e.describe()))?;
        }
        for s in file.service {
            let id = s.id.clone();
            catalogue
                .put_service(s)
                .map_err(|e| format!("service `{id}`: {}", e.describe()))?;
        }
        for c in file.centre {
            let id = c.id.clone();
            catalogue
                .put_centre(c)
                .map_err(|e| format!("centre `{id}`: {}", e.describe()))?;
        }
        Ok(catalogue)
    }

    /// Checks a destination and puts it in.
    pub fn put_destination(&mut self, destination: Destination) -> Result<(), EntryError> {
        let mut violations = Vec::new();
        member(&mut violations, "member", &destination.member, true);
        text(&mut violations, "title_lv", &destination.title_lv, false);
        text(&mut violations, "title_en", &destination.title_en, false);
        if !violations.is_empty() {
            return Err(EntryError::Invalid(violations));
        }
        self.room(&self.destinations, &destination.member)?;
        self.destinations
            .insert(destination.member.clone(), destination);
        Ok(())
    }

    /// Checks a service (its destinations must exist) and puts it in.
    pub fn put_service(&mut self, service: Service) -> Result<(), EntryError> {
        let mut violations = Vec::new();
        if !is_id(&service.id, 64) {
            violations.push((
                "id".into(),
                "must be 1-64 lower-case letters, digits and `-`".into(),
            ));
        }
        text(&mut violations, "title_lv", &service.title_lv, true);
        text(&mut violations, "title_en", &service.title_en, true);
        member(&mut violations, "institution", &service.institution, false);
        if !is_id(&service.form_id, 64) {
            violations.push(("form_id".into(), "is not a form id".into()));
        }
        if service.form_versions.is_empty() || service.form_versions.len() > MAX_FORM_VERSIONS {
            violations.push((
                "form_versions".into(),
                format!("must list 1-{MAX_FORM_VERSIONS} versions"),
            ));
        }
        for (i, version) in service.form_versions.iter().enumerate() {
            if version.is_empty()
                || version.len() > 16
                || !version.bytes().all(|b| b.is_ascii_digit())
            {
                violations.push((
                    format!("form_versions[{i}]"),
                    "is not a version number".into(),
                ));
            }
        }
        if service.channels.is_empty() {
            violations.push(("channels".into(), "must allow at least one channel".into()));
        }
        member(
            &mut violations,
            "default_destination",
            &service.default_destination,
            true,
        );
        if service.routes.len() > MAX_ROUTES {
            violations.push(("routes".into(), format!("at most {MAX_ROUTES}")));
        }
        for (i, route) in service.routes.iter().enumerate() {
            member(
                &mut violations,
                &format!("routes[{i}].destination"),
                &route.destination,
                true,
            );
            if route.municipalities.is_empty()
                || route.municipalities.len() > MAX_ROUTE_MUNICIPALITIES
            {
                violations.push((
                    format!("routes[{i}].municipality_codes"),
                    format!("must name 1-{MAX_ROUTE_MUNICIPALITIES} municipalities"),
                ));
            }
            for (j, code) in route.municipalities.iter().enumerate() {
                if !is_id(code, 64) {
                    violations.push((
                        format!("routes[{i}].municipality_codes[{j}]"),
                        "must be 1-64 lower-case letters, digits and `-`".into(),
                    ));
                }
            }
        }
        if !violations.is_empty() {
            return Err(EntryError::Invalid(violations));
        }
        let destinations = std::iter::once(&service.default_destination)
            .chain(service.routes.iter().map(|r| &r.destination));
        for destination in destinations {
            if !self.destinations.contains_key(destination) {
                return Err(EntryError::Missing(format!(
                    "destination {destination} does not exist: put it first"
                )));
            }
        }
        self.room(&self.services, &service.id)?;
        self.services.insert(service.id.clone(), service);
        Ok(())
    }

    /// Checks a centre (its services must exist) and puts it in.
    pub fn put_centre(&mut self, centre: Centre) -> Result<(), EntryError> {
        let mut violations = Vec::new();
        if !is_id(&centre.id, 64) {
            violations.push((
                "centre_id".into(),
                "must be 1-64 lower-case letters, digits and `-`".into(),
            ));
        }
        member(&mut violations, "municipality", &centre.municipality, false);
        text(
            &mut violations,
            "municipality_name",
            &centre.municipality_name,
            true,
        );
        text(&mut violations, "address", &centre.address, false);
        if centre.services.len() > MAX_CENTRE_SERVICES {
            violations.push((
                "service_ids".into(),
                format!("at most {MAX_CENTRE_SERVICES}"),
            ));
        }
        if !violations.is_empty() {
            return Err(EntryError::Invalid(violations));
        }
        if let Some(missing) = centre
            .services
            .iter()
            .find(|s| !self.services.contains_key(*s))
        {
            return Err(EntryError::Missing(format!(
                "service `{}` does not exist: put it first",
                onestop_platform::status::echo(missing)
            )));
        }
        self.room(&self.centres, &centre.id)?;
        self.centres.insert(centre.id.clone(), centre);
        Ok(())
    }

    fn room<T>(&self, entries: &BTreeMap<String, T>, key: &str) -> Result<(), EntryError> {
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(key) {
            return Err(EntryError::Invalid(vec![(
                "catalogue".into(),
                format!("holds at most {MAX_ENTRIES} entries of a kind"),
            )]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_catalogue_is_consistent_and_routes_by_territory() {
        let catalogue = Catalogue::of(CatalogueFile::parse(SEED).expect("the seed parses"))
            .expect("the seed is consistent");
        assert_eq!(catalogue.services.len(), 5);
        let pension = &catalogue.services["vsaa-old-age-pension"];
        assert_eq!(pension.route("gulbene"), "GOV/VSAA/pensions");
        assert_eq!(pension.route(""), "GOV/VSAA/pensions");
        assert_eq!(pension.route("riga"), "GOV/VSAA/pensions-riga");
        assert!(catalogue.centres.contains_key("gulbene-kac"));
    }

    #[test]
    fn entries_naming_missing_ones_are_refused() {
        let mut catalogue = Catalogue::of(CatalogueFile::parse(SEED).expect("seed")).expect("ok");
        let mut service = catalogue.services["vsaa-old-age-pension"].clone();
        service.default_destination = "GOV/VSAA/nowhere".into();
        assert!(matches!(
            catalogue.put_service(service),
            Err(EntryError::Missing(_))
        ));
        let mut centre = catalogue.centres["gulbene-kac"].clone();
        centre.services.push("no-such-service".into());
        assert!(matches!(
            catalogue.put_centre(centre),
            Err(EntryError::Missing(_))
        ));
    }
}
