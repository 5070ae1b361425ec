//! The e-forms service through the gateway, on SQLite and on PostgreSQL: the seed forms accept
//! their valid examples and reject the invalid ones at the exact fields, versions follow the
//! breaking-version rule, retries do nothing twice, hostile documents are refused cleanly, and
//! page tokens work only for the listing that issued them.

use onestop_integration_tests::{Backend, TestFederation};
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::forms::v1::*;
use onestop_proto::r#type::v1::{LocalizedText, MemberId};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::{on_both_backends, reason, violations};

on_both_backends!(
    seed_forms_accept_valid_data_and_point_at_every_bad_field,
    versions_follow_the_breaking_version_rule,
    retried_requests_change_nothing_twice,
    hostile_documents_are_refused_cleanly,
    deprecated_versions_accept_no_new_data,
    forms_are_listed_in_pages,
    page_tokens_work_only_for_the_listing_that_issued_them,
    formats_are_known_and_enforced,
    fields_beside_a_schema_for_extra_fields_follow_the_breaking_version_rule,
);

const SEED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../services/forms/seed");

fn client(fed: &TestFederation, name: &str) -> FormsServiceClient<Channel> {
    FormsServiceClient::new(fed.gateway_client(name))
}

fn validate(name: &str, data: &Value) -> ValidateFormDataRequest {
    ValidateFormDataRequest {
        name: name.into(),
        data_json: data.to_string(),
    }
}

async fn seed_forms_accept_valid_data_and_point_at_every_bad_field(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut forms = client(&fed, "demo-centre");
    let mut cases = 0;
    for (id, _) in onestop_forms::seed::SEED_FILES {
        let version = format!("forms/{id}/versions/latest");
        let read = |suffix: &str| -> Value {
            let path = format!("{SEED_DIR}/examples/{id}.{suffix}.json");
            serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
        };
        let answer = forms
            .validate_form_data(validate(&version, &read("valid")))
            .await
            .unwrap_or_else(|s| panic!("{id}: the valid example is refused: {:?}", violations(&s)))
            .into_inner();
        assert_eq!(answer.version, format!("forms/{id}/versions/1"));

        for case in read("invalid").as_array().expect("a list of cases") {
            let status = forms
                .validate_form_data(validate(&version, &case["data"]))
                .await
                .expect_err(case["case"].as_str().unwrap());
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{id}: {}",
                case["case"]
            );
            assert_eq!(reason(&status), "INVALID_FORM_DATA");
            let found = violations(&status);
            let mut fields: Vec<String> = found.iter().map(|v| v.field.clone()).collect();
            fields.sort();
            let expected: Vec<String> = serde_json::from_value(case["errors"].clone()).unwrap();
            assert_eq!(fields, expected, "{id}: {}", case["case"]);
            for violation in &found {
                let latvian = violation
                    .localized_message
                    .as_ref()
                    .expect("a Latvian message");
                assert_eq!(latvian.locale, "lv-LV");
                assert!(!latvian.message.is_empty() && !violation.description.is_empty());
            }
            cases += 1;
        }
    }
    assert!(cases >= 30, "only {cases} invalid cases were checked");
    fed.stop().await;
}

fn text(lv: &str, en: &str) -> Option<LocalizedText> {
    Some(LocalizedText {
        lv: lv.into(),
        en: en.into(),
    })
}

fn field(pointer: &str, widget: &str) -> FormField {
    FormField {
        pointer: pointer.into(),
        label: text("Lauks", "Field"),
        widget: widget.into(),
        ..Default::default()
    }
}

fn schema_v1() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": false,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "children": {"type": "integer", "minimum": 0, "maximum": 20}
        }
    })
}

fn create_request(form_id: &str, request_id: &str) -> CreateFormRequest {
    CreateFormRequest {
        request_id: request_id.into(),
        form_id: form_id.into(),
        owner: Some(MemberId {
            member_class: "GOV".into(),
            member_code: "VSAA".into(),
            subsystem: String::new(),
        }),
        title: text("Iesniegums", "Application"),
        description: text("Apraksts", "Description"),
        schema_json: schema_v1().to_string(),
        fields: vec![field("/name", "text"), field("/children", "number")],
    }
}

fn publish(
    form_id: &str,
    request_id: &str,
    schema: &Value,
    breaking: bool,
) -> PublishFormVersionRequest {
    PublishFormVersionRequest {
        request_id: request_id.into(),
        parent: format!("forms/{form_id}"),
        schema_json: schema.to_string(),
        fields: vec![field("/name", "text")],
        breaking,
        title: None,
    }
}

async fn versions_follow_the_breaking_version_rule(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut vsaa = client(&fed, "demo-institution");
    let created = vsaa
        .create_form(create_request("test-benefit", "c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.version.unwrap().name,
        "forms/test-benefit/versions/1"
    );

    // Widening: a new optional field and a longer name.
    let mut wider = schema_v1();
    wider["properties"]["email"] = json!({"type": "string", "format": "email", "maxLength": 254});
    wider["properties"]["name"]["maxLength"] = json!(200);
    let v2 = vsaa
        .publish_form_version(publish("test-benefit", "p2", &wider, false))
        .await
        .unwrap();
    assert_eq!(v2.into_inner().version.unwrap().version, 2);

    // Narrowing, not declared: refused, naming each narrowed field.
    let mut narrower = wider.clone();
    narrower["required"] = json!(["name", "email"]);
    narrower["properties"]
        .as_object_mut()
        .unwrap()
        .remove("children");
    narrower["properties"]["name"]["type"] = json!("integer");
    let status = vsaa
        .publish_form_version(publish("test-benefit", "p3", &narrower, false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "BREAKING_VERSION");
    let mut fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
    fields.sort();
    fields.dedup();
    assert_eq!(fields, ["/children", "/email", "/name"]);

    // The same change, declared breaking, is published.
    let v3 = vsaa
        .publish_form_version(publish("test-benefit", "p3-breaking", &narrower, true))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!((v3.version, v3.breaking), (3, true));

    // Data is checked against the version asked for.
    let old_data = json!({"name": "Jānis", "children": 2});
    vsaa.validate_form_data(validate("forms/test-benefit/versions/1", &old_data))
        .await
        .unwrap();
    let status = vsaa
        .validate_form_data(validate("forms/test-benefit/versions/latest", &old_data))
        .await
        .unwrap_err();
    let mut fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
    fields.sort();
    assert_eq!(fields, ["/children", "/email", "/name"]);

    // Only the owner (or an operator) publishes: another institution, which the access policy
    // lets use the forms service, may not.
    fed.issue_member("other-institution", "GOV/NVA/registry");
    let mut nva = client(&fed, "other-institution");
    let status = nva
        .publish_form_version(publish("test-benefit", "p4", &wider, true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_FORM_OWNER");

    // A schema with a remote reference or a typo is refused with the place of the problem.
    let remote = json!({"$ref": "https://example.org/person.json"});
    let status = vsaa
        .publish_form_version(publish("test-benefit", "p5", &remote, true))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_SCHEMA");
    fed.stop().await;
}

async fn retried_requests_change_nothing_twice(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut vsaa = client(&fed, "demo-institution");
    let first = vsaa
        .create_form(create_request("retried-form", "create-1"))
        .await
        .unwrap()
        .into_inner();
    let again = vsaa
        .create_form(create_request("retried-form", "create-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.form.unwrap().name, again.form.unwrap().name);

    // The same request id with other content is not a retry but the caller's mistake: it is
    // refused, neither answered with the first result nor carried out.
    let status = vsaa
        .create_form(create_request("another-form", "create-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    assert_eq!(violations(&status)[0].field, "request_id");
    let status = vsaa
        .get_form(GetFormRequest {
            name: "forms/another-form".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "the retry created nothing");

    // Another request for the same id is a conflict, not a retry.
    let status = vsaa
        .create_form(create_request("retried-form", "create-2"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    let mut wider = schema_v1();
    wider["properties"]["note"] = json!({"type": "string", "maxLength": 10});
    let v2 = vsaa
        .publish_form_version(publish("retried-form", "pub-1", &wider, false))
        .await
        .unwrap();
    let v2_again = vsaa
        .publish_form_version(publish("retried-form", "pub-1", &wider, false))
        .await
        .unwrap();
    assert_eq!(v2.into_inner().version, v2_again.into_inner().version);
    let listed = vsaa
        .list_form_versions(ListFormVersionsRequest {
            parent: "forms/retried-form".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.versions.len(), 2, "the retry published nothing");

    // A retry that changed its schema on the way is refused and publishes nothing.
    let mut other = wider.clone();
    other["properties"]["note"]["maxLength"] = json!(20);
    let status = vsaa
        .publish_form_version(publish("retried-form", "pub-1", &other, false))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "REQUEST_ID_REUSED", "{status:?}");
    let listed = vsaa
        .list_form_versions(ListFormVersionsRequest {
            parent: "forms/retried-form".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.versions.len(),
        2,
        "the changed retry published nothing"
    );

    // A request id reused for another method is the caller's mistake.
    let status = vsaa
        .deprecate_form_version(DeprecateFormVersionRequest {
            request_id: "pub-1".into(),
            name: "forms/retried-form/versions/1".into(),
            reason: "replaced".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    fed.stop().await;
}

async fn hostile_documents_are_refused_cleanly(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut forms = client(&fed, "demo-centre");
    let latest = "forms/pmlp-residence-declaration/versions/latest";

    // Larger than the document limit (256 KiB) but well within the message limit.
    let oversized = json!({"declarant": {"given_name": "x".repeat(300 * 1024)}});
    let status = forms
        .validate_form_data(validate(latest, &oversized))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_JSON");

    // 10,000 levels of nesting.
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let status = forms
        .validate_form_data(ValidateFormDataRequest {
            name: latest.into(),
            data_json: deep,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violations(&status)[0].field, "data_json");

    // Not JSON at all, an unknown form, a malformed name.
    let status = forms
        .validate_form_data(ValidateFormDataRequest {
            name: latest.into(),
            data_json: "{not json".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = forms
        .validate_form_data(validate("forms/no-such-form/versions/1", &json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = forms
        .validate_form_data(validate(
            "forms/pmlp-residence-declaration/versions/99",
            &json!({}),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("versions/99"), "{status:?}");
    let status = forms
        .validate_form_data(validate("../etc/passwd", &json!({})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The service is unharmed.
    forms
        .get_form(GetFormRequest {
            name: "forms/pmlp-residence-declaration".into(),
        })
        .await
        .expect("still serving");
    fed.stop().await;
}

async fn deprecated_versions_accept_no_new_data(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut vsaa = client(&fed, "demo-institution");
    vsaa.create_form(create_request("short-lived", "c"))
        .await
        .unwrap();
    let mut wider = schema_v1();
    wider["properties"]["note"] = json!({"type": "string", "maxLength": 10});
    vsaa.publish_form_version(publish("short-lived", "p", &wider, false))
        .await
        .unwrap();
    let deprecated = vsaa
        .deprecate_form_version(DeprecateFormVersionRequest {
            request_id: "d".into(),
            name: "forms/short-lived/versions/1".into(),
            reason: "the law changed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(deprecated.state(), FormVersionState::Deprecated);
    let data = json!({"name": "Anna"});
    let status = vsaa
        .validate_form_data(validate("forms/short-lived/versions/1", &data))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("use version 2"), "{status:?}");
    let latest = vsaa
        .get_form_version(GetFormVersionRequest {
            name: "forms/short-lived/versions/latest".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(latest.version, 2);
    vsaa.validate_form_data(validate("forms/short-lived/versions/latest", &data))
        .await
        .unwrap();
    fed.stop().await;
}

async fn forms_are_listed_in_pages(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut forms = client(&fed, "demo-centre");
    let mut expected: Vec<String> = onestop_forms::seed::SEED_FILES
        .iter()
        .map(|(id, _)| format!("forms/{id}"))
        .collect();
    expected.sort();
    // The five seed forms: pages of 2, 2 and 1; one page of 5, which is the last and says so.
    for (size, pages) in [(2, 3), (5, 1), (4, 2), (100, 1)] {
        let (names, calls) = list_all_forms(&mut forms, size).await;
        assert_eq!(names, expected, "pages of {size}");
        assert_eq!(calls, pages, "pages of {size}");
    }

    let vsaa_only = forms
        .list_forms(ListFormsRequest {
            page_size: 0,
            page_token: String::new(),
            owner: Some(MemberId {
                member_class: "GOV".into(),
                member_code: "VSAA".into(),
                subsystem: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vsaa_only.forms.len(), 2);
    let status = forms
        .list_forms(ListFormsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    fed.stop().await;
}

/// Every form, listed in pages of `size`, and how many calls that took.
async fn list_all_forms(
    forms: &mut FormsServiceClient<Channel>,
    size: i32,
) -> (Vec<String>, usize) {
    let (mut names, mut calls, mut token) = (Vec::new(), 0, String::new());
    loop {
        let page = forms
            .list_forms(ListFormsRequest {
                page_size: size,
                page_token: token.clone(),
                owner: None,
            })
            .await
            .unwrap()
            .into_inner();
        calls += 1;
        assert!(page.forms.len() <= size as usize);
        names.extend(page.forms.into_iter().map(|f| f.name));
        if page.next_page_token.is_empty() {
            return (names, calls);
        }
        token = page.next_page_token;
    }
}

/// Asserts that a status refuses the request's `page_token`.
fn assert_page_token_refused(status: &tonic::Status) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = violations(status).into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["page_token"], "{status:?}");
}

async fn page_tokens_work_only_for_the_listing_that_issued_them(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut forms = client(&fed, "demo-centre");
    let list = |page_token: &str, owner: Option<&str>| ListFormsRequest {
        page_size: 2,
        page_token: page_token.to_owned(),
        owner: owner.map(|code| MemberId {
            member_class: "GOV".into(),
            member_code: code.into(),
            subsystem: String::new(),
        }),
    };
    let token = forms
        .list_forms(list("", None))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    forms.list_forms(list(&token, None)).await.unwrap();

    // The same token with another filter, or for another listing.
    let status = forms
        .list_forms(list(&token, Some("VSAA")))
        .await
        .unwrap_err();
    assert_page_token_refused(&status);
    let status = forms
        .list_form_versions(ListFormVersionsRequest {
            parent: "forms/pmlp-residence-declaration".into(),
            page_size: 1,
            page_token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_page_token_refused(&status);

    // Altered, or made up: the old layout was the last form id in base64.
    let mut altered = token.clone().into_bytes();
    altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let status = forms.list_forms(list(&altered, None)).await.unwrap_err();
    assert_page_token_refused(&status);
    // base64url("nva-unemployed-registration")
    let forged = "bnZhLXVuZW1wbG95ZWQtcmVnaXN0cmF0aW9u";
    let status = forms.list_forms(list(forged, None)).await.unwrap_err();
    assert_page_token_refused(&status);
    fed.stop().await;
}

async fn formats_are_known_and_enforced(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    let mut vsaa = client(&fed, "demo-institution");
    let mut schema = schema_v1();
    schema["properties"]["email"] = json!({"type": "string", "format": "emial"});
    let mut request = create_request("typo-form", "typo");
    request.schema_json = schema.to_string();
    let status = vsaa.create_form(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(&status), "INVALID_SCHEMA");
    let found = violations(&status);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "schema_json/properties/email/format");
    assert!(found[0].description.contains("`emial`"), "{found:?}");

    schema["properties"]["email"] = json!({"type": "string", "format": "idn-email"});
    schema["properties"]["website"] = json!({"type": "string", "format": "idn-hostname"});
    let mut request = create_request("idn-form", "idn");
    request.schema_json = schema.to_string();
    vsaa.create_form(request).await.unwrap();
    // A version may not bring an unknown format either.
    let mut typo = schema.clone();
    typo["properties"]["website"]["format"] = json!("hostnme");
    let status = vsaa
        .publish_form_version(publish("idn-form", "typo-2", &typo, true))
        .await
        .unwrap_err();
    assert_eq!(
        violations(&status)[0].field,
        "schema_json/properties/website/format"
    );

    let version = "forms/idn-form/versions/latest";
    let good = json!({"name": "Jānis", "email": "jānis@piemērs.lv", "website": "piemērs.lv"});
    vsaa.validate_form_data(validate(version, &good))
        .await
        .unwrap();
    let bad =
        json!({"name": "Jānis", "email": "Jānis <jānis@piemērs.lv>", "website": "-piemērs.lv"});
    let status = vsaa
        .validate_form_data(validate(version, &bad))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_FORM_DATA");
    let fields: Vec<(String, String)> = violations(&status)
        .into_iter()
        .map(|v| (v.field, v.reason))
        .collect();
    assert_eq!(
        fields,
        [
            ("/email".to_owned(), "FORMAT".to_owned()),
            ("/website".to_owned(), "FORMAT".to_owned())
        ]
    );
    fed.stop().await;
}

async fn fields_beside_a_schema_for_extra_fields_follow_the_breaking_version_rule(
    backend: Backend,
) {
    let fed = TestFederation::start(backend).await;
    let mut vsaa = client(&fed, "demo-institution");
    // Extra fields are accepted as short texts.
    let mut open = schema_v1();
    open["additionalProperties"] = json!({"type": "string", "maxLength": 50});
    let mut request = create_request("open-form", "open");
    request.schema_json = open.to_string();
    vsaa.create_form(request).await.unwrap();

    // `children` (an integer) would fall to the rule for extra fields, which takes only text.
    let mut removed = open.clone();
    removed["properties"]
        .as_object_mut()
        .unwrap()
        .remove("children");
    let status = vsaa
        .publish_form_version(publish("open-form", "removed", &removed, false))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "BREAKING_VERSION", "{status:?}");
    let mut fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
    fields.dedup();
    assert_eq!(fields, ["/children"]);

    // A new field shorter than any extra text was allowed to be narrows; a looser one does not.
    let mut added = open.clone();
    added["properties"]["note"] = json!({"type": "string", "maxLength": 10});
    let status = vsaa
        .publish_form_version(publish("open-form", "added", &added, false))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "BREAKING_VERSION", "{status:?}");
    assert_eq!(violations(&status)[0].field, "/note");
    added["properties"]["note"] = json!({"type": ["string", "null"], "maxLength": 100});
    vsaa.publish_form_version(publish("open-form", "added-wider", &added, false))
        .await
        .unwrap();
    fed.stop().await;
}
