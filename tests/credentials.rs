//! Every credential kind, and every way each one must fail (DESIGN §3; issue: foundation §4).

mod common;

use std::sync::Arc;

use common::*;
use cuttle::auth::session_token::{self, MintError, MintRequest};
use cuttle::auth::{AuthCacheSettings, AuthError, Authenticator};
use cuttle::policy::ActorType;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

fn err(auth: &Authenticator, token: &str) -> AuthError {
    auth.authenticate(token).expect_err("must be refused")
}

// ---------------------------------------------------------------- device tokens, server keys

#[test]
fn device_token_resolves_to_its_listed_actor() {
    let auth = authenticator();
    let a = auth.authenticate(SENSOR1_TOKEN).unwrap();
    assert_eq!(
        (&*a.project, &*a.id, a.kind),
        ("demo", "sensor-1", ActorType::Device)
    );
    assert_eq!(a.scope(), Some("acme"));
    assert_eq!(a.expires_at, None);
    assert_eq!(
        auth.verifications(),
        0,
        "hash lookups are not signature checks"
    );
}

#[test]
fn server_key_resolves_and_is_bound_to_its_project() {
    let auth = authenticator();
    let billing = auth.authenticate(BILLING_KEY).unwrap();
    assert_eq!(
        (&*billing.project, billing.kind),
        ("demo", ActorType::Server)
    );
    assert_eq!(billing.scope(), None);

    // A key of project `rsa` is an actor of `rsa`: it never reaches `demo`'s apps.
    let ops = auth.authenticate(OPS_KEY).unwrap();
    assert_eq!((&*ops.project, &*ops.id), ("rsa", "ops-bot"));
    let topic = cuttle::topic::ClientTopic::parse("chat/general/orders").unwrap();
    assert_eq!(
        auth.policy()
            .authorize(&ops, topic, cuttle::policy::Access::Write),
        Err(cuttle::policy::Denial::UnknownApp)
    );
}

#[test]
fn unknown_and_malformed_opaque_tokens_are_refused() {
    let auth = authenticator();
    assert_eq!(err(&auth, "no-such-token"), AuthError::UnknownCredential);
    // The stored hash itself is not a credential.
    assert_eq!(
        err(&auth, &sha(SENSOR1_TOKEN)),
        AuthError::UnknownCredential
    );
    assert_eq!(err(&auth, ""), AuthError::BadLength);
    assert_eq!(err(&auth, &"x".repeat(8193)), AuthError::BadLength);
    assert_eq!(err(&auth, "no-such-token").wire_error(), "access_denied");
}

// ---------------------------------------------------------------- user JWTs

#[test]
fn valid_user_jwt_listed_and_unlisted() {
    let auth = authenticator();
    // Listed user: the policy's scope applies.
    let alice = auth.authenticate(&hs256(&user_claims("alice"))).unwrap();
    assert_eq!(
        (&*alice.id, alice.kind, alice.scope()),
        ("alice", ActorType::User, Some("acme"))
    );
    assert!(alice.expires_at.unwrap() > now());

    // Unlisted user: scope and roles from the claims; unknown roles are ignored.
    let mut c = user_claims("carol");
    c["scope"] = json!("globex");
    c["roles"] = json!(["moderator", "astronaut"]);
    let carol = auth.authenticate(&hs256(&c)).unwrap();
    assert_eq!(carol.scope(), Some("globex"));
    assert_eq!(
        carol.roles.iter().map(|r| &**r).collect::<Vec<_>>(),
        ["moderator"]
    );

    // Roles as a space-separated string; HS384 is also pinned for this project.
    let mut c = user_claims("dave");
    c["roles"] = json!("auditor moderator");
    let t = sign(
        Algorithm::HS384,
        None,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        &c,
    );
    assert_eq!(auth.authenticate(&t).unwrap().roles.len(), 2);
}

#[test]
fn jwt_signature_and_time_failures() {
    let auth = authenticator();
    let c = user_claims("bob");
    let wrong = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(OTHER_SECRET.as_bytes()),
        &c,
    );
    assert_eq!(err(&auth, &wrong), AuthError::BadSignature);

    // Tampered payload, original signature.
    let good = hs256(&c);
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut forged = c.clone();
    forged["sub"] = json!("alice");
    let forged_token = raw_token(&json!({"alg":"HS256","typ":"JWT"}), &forged, parts[2]);
    parts[1] = forged_token.split('.').nth(1).unwrap();
    assert_eq!(err(&auth, &parts.join(".")), AuthError::BadSignature);

    let mut expired = user_claims("bob");
    expired["exp"] = json!(now() - 120); // beyond the 30 s leeway
    let e = err(&auth, &hs256(&expired));
    assert_eq!(e, AuthError::Expired);
    assert_eq!(e.wire_error(), "token_expired");

    let mut within_leeway = user_claims("bob");
    within_leeway["exp"] = json!(now() - 5);
    assert!(
        auth.authenticate(&hs256(&within_leeway)).is_ok(),
        "small leeway honoured"
    );

    let mut early = user_claims("bob");
    early["nbf"] = json!(now() + 300);
    assert_eq!(err(&auth, &hs256(&early)), AuthError::NotYetValid);
}

#[test]
fn jwt_claim_failures() {
    let auth = authenticator();
    let mut c = user_claims("bob");
    c["iss"] = json!("https://evil.example.com");
    assert_eq!(err(&auth, &hs256(&c)), AuthError::UnknownIssuer);

    let mut c = user_claims("bob");
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(
        err(&auth, &hs256(&c)),
        AuthError::InvalidClaim("iss".into())
    );

    let mut c = user_claims("bob");
    c["aud"] = json!("someone-else");
    assert_eq!(err(&auth, &hs256(&c)), AuthError::WrongAudience);

    for claim in ["aud", "exp", "sub"] {
        let mut c = user_claims("bob");
        c.as_object_mut().unwrap().remove(claim);
        assert_eq!(
            err(&auth, &hs256(&c)),
            AuthError::InvalidClaim(claim.into()),
            "{claim}"
        );
    }

    let mut c = user_claims("");
    c["sub"] = json!("");
    assert_eq!(
        err(&auth, &hs256(&c)),
        AuthError::InvalidClaim("sub".into())
    );
}

#[test]
fn jwt_scope_rules() {
    let auth = authenticator();
    let mut c = user_claims("carol");
    c["scope"] = json!("initech");
    assert_eq!(
        err(&auth, &hs256(&c)),
        AuthError::UnknownScope("initech".into())
    );

    // A listed user's scope is the policy's; a token claiming another is refused.
    let mut c = user_claims("alice");
    c["scope"] = json!("globex");
    assert_eq!(err(&auth, &hs256(&c)), AuthError::ScopeConflict);
    // Claiming the same scope is fine.
    c["scope"] = json!("acme");
    assert!(auth.authenticate(&hs256(&c)).is_ok());
    // A listed unscoped user cannot scope itself.
    let mut c = user_claims("bob");
    c["scope"] = json!("acme");
    assert_eq!(err(&auth, &hs256(&c)), AuthError::ScopeConflict);

    // A user token cannot impersonate a listed device or server.
    assert_eq!(
        err(&auth, &hs256(&user_claims("sensor-1"))),
        AuthError::NotAUser(ActorType::Device)
    );
    assert_eq!(
        err(&auth, &hs256(&user_claims("billing"))),
        AuthError::NotAUser(ActorType::Server)
    );
}

#[test]
fn alg_none_is_refused() {
    let auth = authenticator();
    let token = raw_token(
        &json!({"alg": "none", "typ": "JWT"}),
        &user_claims("bob"),
        "",
    );
    assert_eq!(err(&auth, &token), AuthError::Malformed("JWT header"));
    let token = raw_token(&json!({"alg": "None"}), &user_claims("bob"), "");
    assert!(matches!(err(&auth, &token), AuthError::Malformed(_)));
}

#[test]
fn algorithms_are_pinned_by_config() {
    let auth = authenticator();
    let t = sign(
        Algorithm::HS512,
        None,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        &user_claims("bob"),
    );
    assert!(matches!(err(&auth, &t), AuthError::AlgorithmNotAllowed(_)));

    // An RS256 token sent to the HS256 project does not get an RSA check either.
    let mut c = user_claims("bob");
    c["iss"] = json!("https://id.example.com");
    let t = sign(Algorithm::RS256, None, &rsa_key(), &c);
    assert!(matches!(err(&auth, &t), AuthError::AlgorithmNotAllowed(_)));
}

fn rsa_claims(sub: &str) -> serde_json::Value {
    let mut c = user_claims(sub);
    c["iss"] = json!("https://rsa.example.com");
    c
}

#[test]
fn algorithm_confusion_is_refused() {
    // The classic attack: HS256 "signed" with the RS256 project's public key as HMAC secret.
    let auth = authenticator();
    let public_pem = fixture("rsa_public.pem");
    let t = sign(
        Algorithm::HS256,
        Some("k1"),
        &EncodingKey::from_secret(&public_pem),
        &rsa_claims("mallory"),
    );
    assert!(matches!(err(&auth, &t), AuthError::AlgorithmNotAllowed(_)));
}

#[test]
fn rsa_keys_are_selected_by_kid() {
    let auth = authenticator();
    let ok1 = sign(Algorithm::RS256, Some("k1"), &rsa_key(), &rsa_claims("u1"));
    assert_eq!(&*auth.authenticate(&ok1).unwrap().project, "rsa");
    let ok2 = sign(Algorithm::RS256, Some("k2"), &rsa2_key(), &rsa_claims("u2"));
    assert!(auth.authenticate(&ok2).is_ok());

    let wrong_key = sign(Algorithm::RS256, Some("k1"), &rsa2_key(), &rsa_claims("u3"));
    assert_eq!(err(&auth, &wrong_key), AuthError::BadSignature);
    let unknown = sign(Algorithm::RS256, Some("k9"), &rsa_key(), &rsa_claims("u4"));
    assert_eq!(err(&auth, &unknown), AuthError::UnknownKeyId("k9".into()));
    // Every key of this project has a kid, so a token without one has no key.
    let none = sign(Algorithm::RS256, None, &rsa_key(), &rsa_claims("u5"));
    assert_eq!(err(&auth, &none), AuthError::MissingKeyId);
}

#[test]
fn ec_and_eddsa_keys_verify() {
    let auth = authenticator();
    let mut c = user_claims("e1");
    c["iss"] = json!("https://ec.example.com");
    let key = EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap();
    assert_eq!(
        &*auth
            .authenticate(&sign(Algorithm::ES256, None, &key, &c))
            .unwrap()
            .project,
        "ec"
    );

    let mut c = user_claims("d1");
    c["iss"] = json!("https://ed.example.com");
    c["groups"] = json!([]); // configured roles claim
    let key = EncodingKey::from_ed_pem(&fixture("ed_private.pem")).unwrap();
    let actor = auth
        .authenticate(&sign(Algorithm::EdDSA, None, &key, &c))
        .unwrap();
    assert_eq!(&*actor.project, "ed");

    // The ed project reads its scope from `tenant`: a `scope` claim is just another claim.
    c["scope"] = json!("anything");
    c["tenant"] = json!("nope");
    let t = sign(Algorithm::EdDSA, None, &key, &c);
    assert_eq!(err(&auth, &t), AuthError::UnknownScope("nope".into()));
}

#[test]
fn malformed_jwts_are_refused() {
    let auth = authenticator();
    for t in ["a.b.c", "..", "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "x.y.z.w"] {
        let e = err(&auth, t);
        assert!(
            matches!(e, AuthError::Malformed(_) | AuthError::UnknownCredential),
            "{t}: {e:?}"
        );
    }
}

#[test]
fn a_project_without_its_secret_refuses_user_tokens() {
    let policy = try_compile_with_env(&policy_yaml(), &|v| {
        (v == "SESSION_SECRET").then(|| SESSION_SECRET.to_string())
    })
    .expect("an unset secret is a warning, not an error");
    let auth = Authenticator::new(Arc::new(policy), AuthCacheSettings::default());
    assert_eq!(
        err(&auth, &hs256(&user_claims("bob"))),
        AuthError::Disabled("JWT")
    );
    // Device tokens still work.
    assert!(auth.authenticate(SENSOR1_TOKEN).is_ok());
}

// ---------------------------------------------------------------- session tokens

fn mint(auth: &Authenticator, req: MintRequest, at: u64) -> String {
    session_token::mint(auth.policy(), &req, at).expect("mint")
}

fn req(ttl_s: u64) -> MintRequest {
    MintRequest {
        project: "demo".into(),
        ttl_s,
        scope: None,
        rooms: vec![],
    }
}

#[test]
fn session_tokens_round_trip() {
    let auth = authenticator();
    let t = mint(
        &auth,
        MintRequest {
            scope: Some("acme".into()),
            rooms: vec!["chat/general".into()],
            ..req(900)
        },
        now(),
    );
    assert!(t.starts_with("cuttle_st_"));
    let a = auth.authenticate(&t).unwrap();
    assert_eq!((a.kind, a.scope()), (ActorType::Session, Some("acme")));
    assert!(a.id.starts_with("sess_"));
    let exp = a.expires_at.unwrap();
    assert!(
        (now() + 890..=now() + 900).contains(&exp),
        "expiry carried: {exp}"
    );
    assert!(a.room_allowed("chat", "general"));
    assert!(!a.room_allowed("chat", "lobby"));

    // Each token is its own session.
    let b = auth.authenticate(&mint(&auth, req(60), now())).unwrap();
    assert_ne!(a.id, b.id);
    assert!(b.rooms.is_none());
}

#[test]
fn session_token_failures() {
    let auth = authenticator();
    // Expired.
    let t = mint(&auth, req(60), now() - 120);
    assert_eq!(err(&auth, &t), AuthError::Expired);
    // Still valid by the token's exp, but the caller's clock says it expired.
    let t = mint(&auth, req(60), now());
    assert_eq!(
        auth.authenticate_at(&t, now() + 61).unwrap_err(),
        AuthError::Expired
    );
    // Issued in the future.
    let t = mint(&auth, req(60), now() + 600);
    assert_eq!(err(&auth, &t), AuthError::NotYetValid);

    // Signed with another secret (e.g. another project's or a rotated one).
    let other = try_compile_with_env(&policy_yaml(), &|v| match v {
        "SESSION_SECRET" => Some(OTHER_SECRET.into()),
        "JWT_SECRET" => Some(JWT_SECRET.into()),
        _ => None,
    })
    .unwrap();
    let foreign = session_token::mint(&other, &req(60), now()).unwrap();
    assert_eq!(err(&auth, &foreign), AuthError::BadSignature);

    // Tampered allow-list.
    let t = mint(
        &auth,
        MintRequest {
            rooms: vec!["chat/general".into()],
            ..req(60)
        },
        now(),
    );
    let jwt = t.strip_prefix("cuttle_st_").unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    let mut claims: serde_json::Value = {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    claims["rooms"] = json!(["chat/general", "chat/lobby"]);
    let forged = raw_token(&json!({"alg":"HS256","typ":"JWT"}), &claims, parts[2]);
    assert_eq!(
        err(&auth, &format!("cuttle_st_{forged}")),
        AuthError::BadSignature
    );

    // Without its prefix the token is just a JWT from an issuer no project has.
    assert_eq!(err(&auth, jwt), AuthError::UnknownIssuer);
    // A project that does not exist.
    claims["aud"] = json!("nope");
    let t = raw_token(&json!({"alg":"HS256"}), &claims, parts[2]);
    assert_eq!(
        err(&auth, &format!("cuttle_st_{t}")),
        AuthError::UnknownProject
    );
}

#[test]
fn session_ttl_is_capped_at_mint_and_at_verify() {
    let auth = authenticator();
    let too_long = session_token::mint(auth.policy(), &req(3601), now());
    assert_eq!(
        too_long,
        Err(MintError::Ttl {
            got: 3601,
            max: 3600
        })
    );
    assert!(matches!(
        session_token::mint(auth.policy(), &req(0), now()),
        Err(MintError::Ttl { .. })
    ));

    // A token minted under a 3600 s cap is refused once the cap is lowered to 60 s.
    let t = mint(&auth, req(3600), now());
    let lowered = policy_yaml().replace("max_ttl_s: 3600", "max_ttl_s: 60");
    let auth2 = Authenticator::new(
        Arc::new(try_compile(&lowered).unwrap()),
        AuthCacheSettings::default(),
    );
    assert_eq!(err(&auth2, &t), AuthError::TtlTooLong);
}

#[test]
fn session_mint_validates_scope_and_rooms() {
    let auth = authenticator();
    let p = auth.policy();
    let mint = |r: MintRequest| session_token::mint(p, &r, now());
    assert_eq!(
        mint(MintRequest {
            scope: Some("initech".into()),
            ..req(60)
        }),
        Err(MintError::UnknownScope("initech".into()))
    );
    for bad in [
        "chat",
        "chat/nope",
        "nope/general",
        "chat/general/x",
        "/general",
    ] {
        assert_eq!(
            mint(MintRequest {
                rooms: vec![bad.into()],
                ..req(60)
            }),
            Err(MintError::UnknownRoom(bad.into())),
            "{bad}"
        );
    }
    assert_eq!(
        mint(MintRequest {
            rooms: vec!["chat/vip".into()],
            ..req(60)
        }),
        Err(MintError::PrivateRoom("chat/vip".into()))
    );
    assert_eq!(
        mint(MintRequest {
            project: "rsa".into(),
            ..req(60)
        }),
        Err(MintError::NotConfigured("rsa".into()))
    );
    assert_eq!(
        mint(MintRequest {
            project: "nope".into(),
            ..req(60)
        }),
        Err(MintError::UnknownProject("nope".into()))
    );
}

#[test]
fn session_scope_removed_from_policy_invalidates_token() {
    let auth = authenticator();
    let t = mint(
        &auth,
        MintRequest {
            scope: Some("globex".into()),
            ..req(600)
        },
        now(),
    );
    let without = policy_yaml()
        .replace(", { slug: globex }", "")
        .replace("scope: globex", "scope: acme");
    let auth2 = Authenticator::new(
        Arc::new(try_compile(&without).unwrap()),
        AuthCacheSettings::default(),
    );
    assert_eq!(err(&auth2, &t), AuthError::UnknownScope("globex".into()));
}

// ---------------------------------------------------------------- cache

#[test]
fn cache_skips_repeat_verification_and_respects_expiry() {
    let auth = authenticator();
    let t = hs256(&user_claims("bob"));
    let first = auth.authenticate(&t).unwrap();
    let second = auth.authenticate(&t).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "served from the cache");
    assert_eq!(auth.verifications(), 1);

    let s = mint(&auth, req(60), now());
    auth.authenticate(&s).unwrap();
    auth.authenticate(&s).unwrap();
    assert_eq!(auth.verifications(), 2);

    // A cached resolution never outlives its token.
    assert_eq!(
        auth.authenticate_at(&s, now() + 61).unwrap_err(),
        AuthError::Expired
    );

    // Failures are not cached: a bad token is re-checked each time.
    let bad = hs256(&json!({"iss": "https://id.example.com"}));
    let before = auth.verifications();
    let _ = auth.authenticate(&bad);
    let _ = auth.authenticate(&bad);
    assert_eq!(auth.verifications(), before + 2);
}

// ---------------------------------------------------------------- revalidation after reload

#[test]
fn revalidation_after_policy_change() {
    let auth = authenticator();
    let sensor = auth.authenticate(SENSOR1_TOKEN).unwrap();
    let alice = auth.authenticate(&hs256(&user_claims("alice"))).unwrap();
    let carol = auth.authenticate(&hs256(&user_claims("carol"))).unwrap();
    let session = auth.authenticate(&mint(&auth, req(600), now())).unwrap();

    // Same policy: everyone stays.
    for a in [&sensor, &alice, &carol, &session] {
        assert_eq!(auth.revalidate(a, now()).unwrap().as_ref(), a.as_ref());
    }

    // sensor-1's token rotated, alice moved to another scope.
    let changed = policy_yaml()
        .replace(&sha(SENSOR1_TOKEN), &sha("rotated"))
        .replace(
            "{ id: alice, type: user, scope: acme }",
            "{ id: alice, type: user, scope: globex }",
        );
    let auth2 = Authenticator::new(
        Arc::new(try_compile(&changed).unwrap()),
        AuthCacheSettings::default(),
    );
    assert_eq!(auth2.revalidate(&sensor, now()), Err(AuthError::Revoked));
    // alice's listed scope changed: she is re-resolved into the new scope (the session closes
    // the connection on a scope change, since its upstream filters name the old namespace).
    assert_eq!(
        auth2.revalidate(&alice, now()).unwrap().scope(),
        Some("globex")
    );
    assert!(auth2.revalidate(&carol, now()).is_ok());
    assert!(auth2.revalidate(&session, now()).is_ok());
    assert_eq!(
        auth2.revalidate(&session, now() + 601),
        Err(AuthError::Expired)
    );

    // alice removed from the policy: a removed listed actor is disconnected (not kept with the
    // scope its listing gave).
    let unlisted = policy_yaml().replace("      - { id: alice, type: user, scope: acme }\n", "");
    assert_ne!(unlisted, policy_yaml());
    let vip_fixed = unlisted.replace("actors: [alice, billing]", "actors: [billing]");
    let auth_u = Authenticator::new(
        Arc::new(try_compile(&vip_fixed).unwrap()),
        AuthCacheSettings::default(),
    );
    assert_eq!(auth_u.revalidate(&alice, now()), Err(AuthError::Revoked));
    assert!(auth_u.revalidate(&carol, now()).is_ok());

    // The JWT secret rotated: tokens verified by the old key end; sessions are unaffected.
    let rotated_jwt = try_compile_with_env(&policy_yaml(), &|v| match v {
        "JWT_SECRET" => Some(OTHER_SECRET.into()),
        other => test_env(other),
    })
    .unwrap();
    let auth_j = Authenticator::new(Arc::new(rotated_jwt), AuthCacheSettings::default());
    assert_eq!(auth_j.revalidate(&carol, now()), Err(AuthError::Revoked));
    assert!(auth_j.revalidate(&session, now()).is_ok());

    // The session secret rotated: sessions signed with the old one end.
    let rotated_session = try_compile_with_env(&policy_yaml(), &|v| match v {
        "SESSION_SECRET" => Some(OTHER_SECRET.into()),
        other => test_env(other),
    })
    .unwrap();
    let auth_s = Authenticator::new(Arc::new(rotated_session), AuthCacheSettings::default());
    assert_eq!(auth_s.revalidate(&session, now()), Err(AuthError::Revoked));

    // max_ttl_s lowered below the session's lifetime: it ends too.
    let lowered = policy_yaml().replace("max_ttl_s: 3600", "max_ttl_s: 60");
    let auth_l = Authenticator::new(
        Arc::new(try_compile(&lowered).unwrap()),
        AuthCacheSettings::default(),
    );
    assert_eq!(
        auth_l.revalidate(&session, now()),
        Err(AuthError::TtlTooLong)
    );

    // Session secret removed: sessions end.
    let no_sessions = try_compile_with_env(&policy_yaml(), &|v| {
        (v == "JWT_SECRET").then(|| JWT_SECRET.to_string())
    })
    .unwrap();
    let auth3 = Authenticator::new(Arc::new(no_sessions), AuthCacheSettings::default());
    assert_eq!(auth3.revalidate(&session, now()), Err(AuthError::Revoked));
}
