//! Validation and indexing: [`PolicySpec`] → [`Policy`].
//!
//! Every check pushes a diagnostic naming its YAML path and carries on, so that one run lists
//! every problem. The result is returned only when there are no errors.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::model::*;
use super::spec::{ActorSpec, AppSpec, LobbySpec, PolicySpec, ProjectSpec, ScopeGrantSpec};
use super::{CompileContext, check_actor_id, check_slug};
use crate::auth::jwt::JwtVerifier;
use crate::auth::session_token::SessionSecret;
use crate::diagnostics::{Diagnostics, key_path, quoted};

/// Compiles a policy spec found at YAML path `root` (normally `policy`).
pub fn compile(
    spec: &PolicySpec,
    root: &str,
    cx: &CompileContext<'_>,
    diags: &mut Diagnostics,
) -> Option<Policy> {
    let errors_before = diags.errors().count();
    let mut policy = Policy::default();
    // App slugs are the first level of the upstream layout, which has no project level: two
    // projects with one app slug would share a namespace, so slugs are unique policy-wide.
    let mut app_owner: HashMap<String, String> = HashMap::new();
    let mut issuer_owner: HashMap<String, String> = HashMap::new();

    for (pi, p) in spec.projects.iter().enumerate() {
        let path = format!("{root}.projects[{pi}]");
        if let Err(why) = check_slug(&p.id) {
            diags.error(
                format!("{path}.id"),
                format!("invalid id {}: {why}", quoted(&p.id)),
            );
        }
        let duplicate = policy.projects.contains_key(p.id.as_str());
        if duplicate {
            diags.error(
                format!("{path}.id"),
                format!("duplicate project id {}", quoted(&p.id)),
            );
            // Still compiled below, so that errors inside it are listed too.
        }
        // Checked on the spec, so that a project whose JWT settings have other errors still
        // claims its issuer.
        if let Some(jwt) = &p.jwt
            && let Some(other) = issuer_owner.insert(jwt.issuer.clone(), p.id.clone())
        {
            diags.error(
                format!("{path}.jwt.issuer"),
                format!(
                    "issuer {} is already used by project {}: the issuer selects the project",
                    quoted(&jwt.issuer),
                    quoted(&other)
                ),
            );
        }
        let project = compile_project(p, &path, cx, diags, &mut app_owner, &mut policy);
        if let Some(jwt) = &project.jwt {
            policy
                .issuers
                .insert(jwt.issuer.clone(), project.id.clone());
        }
        policy
            .projects
            .insert(project.id.clone(), Arc::new(project));
    }
    if spec.projects.is_empty() {
        diags.warn(
            format!("{root}.projects"),
            "no projects: every connection will be refused",
        );
    }
    (diags.errors().count() == errors_before).then_some(policy)
}

fn compile_project(
    p: &ProjectSpec,
    path: &str,
    cx: &CompileContext<'_>,
    diags: &mut Diagnostics,
    app_owner: &mut HashMap<String, String>,
    policy: &mut Policy,
) -> Project {
    let id: Arc<str> = p.id.as_str().into();

    let mut scopes = HashMap::new();
    for (i, s) in p.scopes.iter().enumerate() {
        let sp = format!("{path}.scopes[{i}].slug");
        if let Err(why) = check_slug(&s.slug) {
            diags.error(sp, format!("invalid slug {}: {why}", quoted(&s.slug)));
        } else if scopes.contains_key(s.slug.as_str()) {
            diags.error(sp, format!("duplicate scope {}", quoted(&s.slug)));
        } else {
            let slug: Arc<str> = s.slug.as_str().into();
            scopes.insert(
                slug.clone(),
                Scope {
                    slug,
                    name: s.name.clone(),
                },
            );
        }
    }

    let mut actors = HashMap::new();
    for (i, a) in p.actors.iter().enumerate() {
        let ap = format!("{path}.actors[{i}]");
        if let Some(actor) = compile_actor(a, &ap, &id, &scopes, diags, policy) {
            if actors.contains_key(&*actor.id) {
                diags.error(
                    format!("{ap}.id"),
                    format!("duplicate actor id {}", quoted(&a.id)),
                );
            } else {
                actors.insert(actor.id.clone(), actor);
            }
        }
    }

    let mut apps: HashMap<Arc<str>, App> = HashMap::new();
    let mut app_order: Vec<Arc<str>> = Vec::with_capacity(p.apps.len());
    for (i, a) in p.apps.iter().enumerate() {
        let ap = format!("{path}.apps[{i}]");
        // Uniqueness is checked on the slug alone, so that an app with other errors still
        // claims it (and a duplicate elsewhere is reported).
        if check_slug(&a.slug).is_ok() {
            if p.apps[..i].iter().any(|prev| prev.slug == a.slug) {
                diags.error(
                    format!("{ap}.slug"),
                    format!("duplicate app {}", quoted(&a.slug)),
                );
                continue;
            }
            if let Some(owner) = app_owner.insert(a.slug.clone(), p.id.clone())
                && owner != p.id
            {
                diags.error(
                    format!("{ap}.slug"),
                    format!(
                        "app {} is already declared by project {}: app slugs are unique across projects because they name the upstream namespace",
                        quoted(&a.slug),
                        quoted(&owner)
                    ),
                );
                continue;
            }
        }
        // Kept even with errors of its own (any error fails the whole compile, so it is never
        // served): roles are checked against its topics, and a missing app would report every
        // grant naming one of them as a second, spurious "unknown topic".
        let app = compile_app(a, &ap, &actors, &p.actors, diags);
        app_order.push(app.slug.clone());
        apps.insert(app.slug.clone(), app);
    }

    // A bare `lobbyId` resolves to the first app in policy order that declares it (PROTOCOL
    // A12); later apps' lobbies of that slug are reachable only with their app named.
    let mut lobby_apps: HashMap<Arc<str>, Arc<str>> = HashMap::new();
    for app in app_order.iter().filter_map(|slug| apps.get(slug)) {
        for lobby in app.lobbies.keys() {
            lobby_apps
                .entry(lobby.clone())
                .or_insert_with(|| app.slug.clone());
        }
    }

    let mut roles = HashSet::new();
    for (role, grants) in &p.roles {
        let rp = key_path(&format!("{path}.roles"), role);
        if let Err(why) = check_slug(role) {
            diags.error(&rp, format!("invalid role name {}: {why}", quoted(role)));
            continue;
        }
        let role: Arc<str> = role.as_str().into();
        roles.insert(role.clone());
        for (target, perm) in grants {
            let gp = key_path(&rp, target);
            let Some(perm) = Permission::parse(perm) else {
                diags.error(&gp, unknown_permission(perm));
                continue;
            };
            let (app_filter, topic) = match target.split_once('/') {
                Some((app, topic)) => (Some(app), topic),
                None => (None, target.as_str()),
            };
            let mut matched = 0;
            for app in apps.values_mut() {
                if app_filter.is_some_and(|a| a != &*app.slug) {
                    continue;
                }
                if let Some(acl) = app.topics.get_mut(topic) {
                    acl.role_grants.push((role.clone(), perm));
                    matched += 1;
                }
            }
            // A topic left out for its own error (an invalid name, a duplicate app) has been
            // reported at its own path; naming it here is not a second problem.
            let declared = p
                .apps
                .iter()
                .any(|a| app_filter.is_none_or(|f| f == a.slug) && a.topics.contains_key(topic));
            if matched == 0 && !declared {
                diags.error(
                    &gp,
                    format!(
                        "unknown topic {}: a grant names `topic` (in any app) or `app/topic` of this project",
                        quoted(target)
                    ),
                );
            }
        }
    }

    let jwt = p
        .jwt
        .as_ref()
        .and_then(|j| JwtVerifier::build(j, &format!("{path}.jwt"), cx, diags));

    let session = p.session.as_ref().map(|s| {
        let sp = format!("{path}.session");
        if s.max_ttl_s == 0 || s.max_ttl_s > MAX_SESSION_TTL_S {
            diags.error(
                format!("{sp}.max_ttl_s"),
                format!(
                    "{} is out of range (1..={MAX_SESSION_TTL_S} seconds)",
                    s.max_ttl_s
                ),
            );
        }
        SessionSettings {
            secret: cx
                .secret(&s.secret_env, &format!("{sp}.secret_env"), diags)
                .map(|v| SessionSecret::new(v.expose().as_bytes())),
            secret_env: s.secret_env.clone(),
            max_ttl_s: s.max_ttl_s,
        }
    });

    let webhooks =
        crate::webhook::config::compile(&p.webhooks, &format!("{path}.webhooks"), cx, diags);

    Project {
        id,
        webhooks,
        scopes,
        apps,
        actors,
        roles,
        jwt,
        session,
        app_order,
        lobby_apps,
    }
}

/// Longest session-token lifetime a project may allow: 7 days. Guest access that lasts longer
/// is an account, not a session.
pub const MAX_SESSION_TTL_S: u64 = 7 * 24 * 3600;

fn unknown_permission(value: &str) -> String {
    format!(
        "unknown permission {} (expected read, write, read-write or none)",
        quoted(value)
    )
}

fn compile_actor(
    a: &ActorSpec,
    path: &str,
    project: &Arc<str>,
    scopes: &HashMap<Arc<str>, Scope>,
    diags: &mut Diagnostics,
    policy: &mut Policy,
) -> Option<ListedActor> {
    // The actor is kept whenever its id and type are valid, so that one bad field does not
    // cascade into "unknown actor" errors for the rooms that list it. (Any error fails the
    // whole compile, so nothing half-valid is ever served.)
    let id_ok = check_actor_id(&a.id).map_err(|why| {
        diags.error(
            format!("{path}.id"),
            format!("invalid id {}: {why}", quoted(&a.id)),
        );
    });
    let kind = match ActorType::parse(&a.kind) {
        Some(ActorType::Session) => {
            diags.error(
                format!("{path}.type"),
                "session actors are not listed: they exist only as session tokens",
            );
            None
        }
        Some(k) => Some(k),
        None => {
            diags.error(
                format!("{path}.type"),
                format!(
                    "unknown actor type {} (expected device, user or server)",
                    quoted(&a.kind)
                ),
            );
            None
        }
    };
    let scope = a.scope.as_ref().and_then(|s| {
        let found = scopes.get(s.as_str()).map(|scope| scope.slug.clone());
        if found.is_none() {
            diags.error(
                format!("{path}.scope"),
                format!("unknown scope {}", quoted(s)),
            );
        }
        found
    });
    let kind = kind?;
    let grants = compile_grants(a, kind, path, scopes, diags);

    // Each type has exactly its own credential field (users have none).
    let fields = [
        ("token_sha256", &a.token_sha256),
        ("api_key_sha256", &a.api_key_sha256),
    ];
    let own = match kind {
        ActorType::Device => Some("token_sha256"),
        ActorType::Server => Some("api_key_sha256"),
        ActorType::User | ActorType::Session => None,
    };
    for (name, value) in fields {
        match (value, own) {
            (Some(_), None) => diags.error(
                format!("{path}.{name}"),
                "users authenticate with JWTs; they have no stored credential",
            ),
            (Some(_), Some(own)) if own != name => diags.error(
                format!("{path}.{name}"),
                format!("a {kind} actor's credential is `{own}`"),
            ),
            (None, Some(own)) if own == name => diags.error(
                format!("{path}.{name}"),
                format!("required for a {kind} actor"),
            ),
            (Some(hex_str), Some(_)) => register_credential(
                hex_str,
                &format!("{path}.{name}"),
                project,
                &a.id,
                kind,
                diags,
                policy,
            ),
            (None, _) => {}
        }
    }
    id_ok.ok().map(|()| ListedActor {
        id: a.id.as_str().into(),
        kind,
        scope,
        grants,
    })
}

/// `scopes:` of an actor: server actors only, `"*"` or known slugs, each at most once.
fn compile_grants(
    a: &ActorSpec,
    kind: ActorType,
    path: &str,
    scopes: &HashMap<Arc<str>, Scope>,
    diags: &mut Diagnostics,
) -> ScopeGrants {
    let Some(spec) = &a.scopes else {
        return ScopeGrants::Own;
    };
    let path = format!("{path}.scopes");
    if kind != ActorType::Server {
        diags.error(
            path,
            format!("only server actors have scope grants (this is a {kind} actor; over WebSocket every actor stays in its own scope)"),
        );
        return ScopeGrants::Own;
    }
    match spec {
        ScopeGrantSpec::All(s) if s == "*" => ScopeGrants::All,
        ScopeGrantSpec::All(s) => {
            diags.error(
                path,
                format!(
                    "expected \"*\" or a list of scope slugs, found {}",
                    quoted(s)
                ),
            );
            ScopeGrants::Own
        }
        ScopeGrantSpec::List(list) => {
            let mut granted: Vec<Arc<str>> = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                match scopes.get(s.as_str()) {
                    None => diags.error(
                        format!("{path}[{i}]"),
                        format!("unknown scope {}", quoted(s)),
                    ),
                    Some(_) if granted.iter().any(|g| **g == **s) => diags.error(
                        format!("{path}[{i}]"),
                        format!("scope {} is granted twice", quoted(s)),
                    ),
                    Some(scope) => granted.push(scope.slug.clone()),
                }
            }
            ScopeGrants::Some(granted.into_boxed_slice())
        }
    }
}

fn register_credential(
    hex_str: &str,
    path: &str,
    project: &Arc<str>,
    actor: &str,
    kind: ActorType,
    diags: &mut Diagnostics,
    policy: &mut Policy,
) {
    let Some(digest) = parse_sha256(hex_str) else {
        diags.error(
            path,
            format!(
                "malformed hash {}: expected 64 hex digits (the SHA-256 that `cuttle hash-token` prints)",
                quoted(hex_str)
            ),
        );
        return;
    };
    if let Some(prev) = policy.credentials.get(&digest) {
        diags.error(
            path,
            format!(
                "the same credential hash is already used by actor {} of project {}",
                quoted(&prev.actor),
                quoted(&prev.project)
            ),
        );
        return;
    }
    policy.credentials.insert(
        digest,
        CredentialEntry {
            project: project.clone(),
            actor: actor.into(),
            kind,
        },
    );
}

fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Compiles app `a`, reporting every problem. The app is returned even when it has errors, so
/// that what refers to it (roles) is checked against everything it declares; the compile as a
/// whole fails on any error.
fn compile_app(
    a: &AppSpec,
    path: &str,
    actors: &HashMap<Arc<str>, ListedActor>,
    declared_actors: &[ActorSpec],
    diags: &mut Diagnostics,
) -> App {
    if let Err(why) = check_slug(&a.slug) {
        diags.error(
            format!("{path}.slug"),
            format!("invalid slug {}: {why}", quoted(&a.slug)),
        );
    }
    let mut topics = HashMap::new();
    for (name, perms) in &a.topics {
        let tp = key_path(&format!("{path}.topics"), name);
        if let Err(why) = check_slug(name) {
            diags.error(&tp, format!("invalid topic name {}: {why}", quoted(name)));
            continue;
        }
        let mut by_type = [Permission::NONE; 4];
        // `server` has full topic access unless the topic lists it (DESIGN §3).
        by_type[ActorType::Server as usize] = Permission::READ_WRITE;
        for (kind, perm) in perms {
            let Some(kind) = ActorType::parse(kind) else {
                diags.error(
                    key_path(&tp, kind),
                    format!(
                        "unknown actor type {} (expected device, user, server or session)",
                        quoted(kind)
                    ),
                );
                continue;
            };
            match Permission::parse(perm) {
                Some(p) => by_type[kind as usize] = p,
                None => diags.error(key_path(&tp, kind.as_str()), unknown_permission(perm)),
            }
        }
        topics.insert(Arc::from(name.as_str()), TopicAcl::new(by_type));
    }
    let mut rooms = HashMap::new();
    for (i, r) in a.rooms.iter().enumerate() {
        let rp = format!("{path}.rooms[{i}]");
        if let Err(why) = check_slug(&r.slug) {
            diags.error(
                format!("{rp}.slug"),
                format!("invalid slug {}: {why}", quoted(&r.slug)),
            );
            continue;
        }
        if rooms.contains_key(r.slug.as_str()) {
            diags.error(
                format!("{rp}.slug"),
                format!("duplicate room {}", quoted(&r.slug)),
            );
            continue;
        }
        let mut members = HashSet::new();
        for (j, actor) in r.actors.iter().enumerate() {
            let mp = format!("{rp}.actors[{j}]");
            match actors.get(actor.as_str()) {
                // An actor left out for its own error (an invalid id or type) has been
                // reported at its own path; naming it here is not a second problem.
                None if declared_actors.iter().any(|d| d.id == *actor) => {}
                None => diags.error(mp, format!("unknown actor {}", quoted(actor))),
                Some(listed) => {
                    if !members.insert(listed.id.clone()) {
                        diags.error(mp, format!("duplicate actor {}", quoted(actor)));
                    }
                }
            }
        }
        let slug: Arc<str> = r.slug.as_str().into();
        rooms.insert(
            slug.clone(),
            Room {
                slug,
                members: (!r.actors.is_empty()).then_some(members),
            },
        );
    }
    // Lobby slugs are a namespace of their own (the wire names a lobby only as `lobbyId`, a
    // room only as `roomId` or a topic level), so a lobby may be named like a room.
    let mut lobbies = HashMap::new();
    // Uniqueness is checked on the slug alone, so that a lobby with other errors still claims
    // it and its duplicate is reported too.
    let mut lobby_slugs = HashSet::new();
    for (i, l) in a.lobbies.iter().enumerate() {
        let lp = format!("{path}.lobbies[{i}]");
        let mut lobby_ok = true;
        if let Err(why) = check_slug(&l.slug) {
            diags.error(
                format!("{lp}.slug"),
                format!("invalid slug {}: {why}", quoted(&l.slug)),
            );
            lobby_ok = false;
        } else if !lobby_slugs.insert(l.slug.as_str()) {
            diags.error(
                format!("{lp}.slug"),
                format!("duplicate lobby {}", quoted(&l.slug)),
            );
            lobby_ok = false;
        }
        if let Some(members) = compile_lobby_rooms(l, &lp, a, &rooms, diags)
            && lobby_ok
        {
            let slug: Arc<str> = l.slug.as_str().into();
            lobbies.insert(
                slug.clone(),
                Lobby {
                    slug,
                    rooms: members,
                },
            );
        }
    }
    App {
        slug: a.slug.as_str().into(),
        topics,
        rooms,
        lobbies,
    }
}

/// The rooms of lobby `l` at YAML path `path`, resolved against the app's compiled `rooms`;
/// `None` after reporting every problem.
fn compile_lobby_rooms(
    l: &LobbySpec,
    path: &str,
    app: &AppSpec,
    rooms: &HashMap<Arc<str>, Room>,
    diags: &mut Diagnostics,
) -> Option<Vec<Arc<str>>> {
    let mut ok = true;
    let rp = format!("{path}.rooms");
    if l.rooms.is_empty() {
        diags.error(&rp, "a lobby needs at least one room");
        ok = false;
    } else if l.rooms.len() > MAX_LOBBY_ROOMS {
        diags.error(
            &rp,
            format!(
                "{} rooms: a lobby has at most {MAX_LOBBY_ROOMS}",
                l.rooms.len()
            ),
        );
        ok = false;
    }
    let mut members: Vec<Arc<str>> = Vec::with_capacity(l.rooms.len().min(MAX_LOBBY_ROOMS));
    let mut seen = HashSet::new();
    for (j, room) in l.rooms.iter().enumerate() {
        let mp = format!("{rp}[{j}]");
        match rooms.get(room.as_str()) {
            // A room left out for its own invalid slug has been reported at its own path;
            // naming it here is not a second problem.
            None if app.rooms.iter().any(|r| r.slug == *room) => ok = false,
            None => {
                diags.error(mp, format!("unknown room {}", quoted(room)));
                ok = false;
            }
            Some(r) if !seen.insert(r.slug.clone()) => {
                diags.error(mp, format!("duplicate room {}", quoted(room)));
                ok = false;
            }
            Some(r) => members.push(r.slug.clone()),
        }
    }
    ok.then_some(members)
}
