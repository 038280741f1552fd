//! Models other members hold: every member's catalog (what it can load by
//! name), and loading a model this device lacks by receiving from a member
//! that serves it the header and the tensors this device needs (the rest
//! of a stage's tensors come when the leader assigns it, see
//! [`crate::model_file`]).
//!
//! A member's catalog crosses the network as a `Control::Catalog`: at most
//! [`MAX_CATALOG`] models, each name at most [`MAX_NAME`] bytes without
//! control characters, and facts whose text is as bounded; anything else
//! is refused whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::RuntimeError;
use crate::catalog::ModelEntry;
use crate::control::Control;
use crate::pipeline::service::Service;

/// Most models one member's catalog may list (at the longest texts, a
/// catalog stays under a control document's 1 MiB).
pub(crate) const MAX_CATALOG: usize = 512;
/// Longest model name (and fact text) in a member's catalog, in bytes.
pub(crate) const MAX_NAME: usize = 256;
/// How long members' catalogs are reused before they are asked again.
const CATALOG_TTL: Duration = Duration::from_secs(2);
/// How long a member has to answer for its catalog.
pub(crate) const CATALOG_WAIT: Duration = Duration::from_secs(2);
/// How long a device loading a model from members waits for one of them
/// to serve it (a newer load or an unload ends the wait at once).
const ADOPT_WAIT: Duration = Duration::from_secs(300);
/// Most holders a `Load` order may name.
pub(crate) const MAX_HOLDERS: usize = 256;
/// How often it looks while none does.
const ADOPT_POLL: Duration = Duration::from_millis(500);

/// One member's catalog.
#[derive(Debug, Clone)]
pub(crate) struct MemberCatalog {
    pub node_id: String,
    pub name: String,
    pub models: Vec<ModelEntry>,
}

/// Members' catalogs as last asked, and when; one fan-out at a time.
#[derive(Default)]
pub(crate) struct CatalogCache {
    last: std::sync::Mutex<Option<(Instant, Vec<MemberCatalog>)>>,
    asking: tokio::sync::Mutex<()>,
}

impl CatalogCache {
    /// The catalogs if asked within `ttl`.
    fn within(&self, ttl: Duration) -> Option<Vec<MemberCatalog>> {
        let last = self.last.lock().ok()?;
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, c)| c.clone())
    }

    fn any(&self) -> Option<Vec<MemberCatalog>> {
        self.within(Duration::MAX)
    }

    fn store(&self, c: Vec<MemberCatalog>) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), c));
        }
    }
}

/// This device's catalog as members are told it: the models it holds (not
/// those it would have to download), each with its file's facts. Blocking.
pub(crate) fn own_catalog(service: &Service) -> Vec<ModelEntry> {
    let Some(source) = service.source() else {
        return Vec::new();
    };
    let mut seen = std::collections::HashSet::new();
    let mut listed = source.list();
    crate::adapters::annotate(service, &mut listed);
    // A name listed twice (a fine-tune named as a stored model) is sent
    // once: the store loads one file by it.
    listed
        .into_iter()
        .filter(|m| !m.download && check_entry(m).is_ok() && seen.insert(m.name.clone()))
        .take(MAX_CATALOG)
        .map(|mut m| {
            // (An adapter's own folder is no model to describe.)
            let adapter_only = m.adapter.is_some() && !m.has_model_file();
            m.facts = m
                .path
                .as_deref()
                .filter(|_| !adapter_only)
                .and_then(crate::catalog::model_facts);
            if m.facts
                .as_ref()
                .is_some_and(|f| check_entry_facts(f).is_err())
            {
                m.facts = None;
            }
            m
        })
        .collect()
}

fn check_text(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_NAME {
        return Err(format!("{what} of {} bytes (at most {MAX_NAME})", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{what} {s:?} holds control characters"));
    }
    Ok(())
}

fn check_entry(m: &ModelEntry) -> Result<(), String> {
    if m.name.trim().is_empty() {
        return Err("a model without a name".into());
    }
    check_text("a model name", &m.name)?;
    if let Some(a) = &m.adapter {
        crate::adapters::check_facts(a)?;
    }
    m.facts.as_ref().map_or(Ok(()), check_entry_facts)
}

fn check_entry_facts(f: &crate::catalog::ModelFacts) -> Result<(), String> {
    for (what, s) in [
        ("a format", &f.format),
        ("an architecture", &f.architecture),
        ("a quantization", &f.quantization),
        ("a digest", &f.digest),
    ] {
        check_text(what, s)?;
    }
    Ok(())
}

/// Checks a catalog received from a member: bounded and well formed, or
/// refused whole. What a member claims about others is dropped.
pub(crate) fn check_catalog(models: Vec<ModelEntry>) -> Result<Vec<ModelEntry>, String> {
    if models.len() > MAX_CATALOG {
        return Err(format!(
            "a catalog of {} models (at most {MAX_CATALOG})",
            models.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    models
        .into_iter()
        .map(|mut m| {
            check_entry(&m)?;
            if m.download {
                return Err(format!("{} is listed as not held", m.name));
            }
            if !seen.insert(m.name.clone()) {
                return Err(format!("{} is listed twice", m.name));
            }
            m.holders.clear();
            m.path = None;
            Ok(m)
        })
        .collect()
}

/// Every other member's catalog, asked at most every 2 s (a member that
/// does not answer in time, or answers badly, lists nothing). `wait`:
/// ask now if the last answers are older; else stale answers are given at
/// once and fresh ones asked for in the background.
pub(crate) async fn member_catalogs(service: &Service, wait: bool) -> Vec<MemberCatalog> {
    let cache = service.catalog_cache();
    if let Some(c) = cache.within(CATALOG_TTL) {
        return c;
    }
    if !wait && let Some(stale) = cache.any() {
        let s = service.clone();
        tokio::spawn(async move {
            let cache = s.catalog_cache();
            if let Ok(_asking) = cache.asking.try_lock() {
                cache.store(ask_catalogs(&s).await);
            }
        });
        return stale;
    }
    let _asking = cache.asking.lock().await;
    if let Some(c) = cache.within(CATALOG_TTL) {
        return c;
    }
    let c = ask_catalogs(service).await;
    cache.store(c.clone());
    c
}

async fn ask_catalogs(service: &Service) -> Vec<MemberCatalog> {
    let peers = service.endpoint().peers();
    let asks = peers.iter().map(|p| {
        let id = p.info().node_id.to_string();
        async move {
            crate::control::request_peer(service, &id, &Control::CatalogRequest, CATALOG_WAIT).await
        }
    });
    let replies = futures_util::future::join_all(asks).await;
    let mut out = Vec::new();
    for (p, r) in peers.iter().zip(replies) {
        let (node_id, name) = (p.info().node_id.to_string(), p.info().name.clone());
        match r.map_err(|e| e.to_string()).and_then(|r| match r {
            Control::Catalog { models } => check_catalog(models),
            Control::Failed { reason, .. } => Err(reason),
            _ => Err("an unexpected reply".into()),
        }) {
            Ok(models) => out.push(MemberCatalog {
                node_id,
                name,
                models,
            }),
            Err(e) => debug!("no catalog from {name}: {e}"),
        }
    }
    out
}

/// Whether this device could receive `m` from a member: a GGUF file (as
/// far as its holder said) under a name that can be a file's, on a device
/// that takes models from members.
fn receivable(m: &ModelEntry, takes: bool) -> bool {
    takes
        && m.facts.as_ref().is_none_or(|f| f.format == "gguf")
        && crate::model_file::peer_file_name(&m.name, "0").is_ok()
}

/// Every model the cluster can load by name: this device's own (those it
/// would download included), then those only members hold, each with the
/// members that hold it (`holders`, by name).
pub(crate) async fn cluster_models(service: &Service) -> Vec<ModelEntry> {
    let own = {
        let s = service.clone();
        tokio::task::spawn_blocking(move || {
            let mut own = s.source().map(|s| s.list()).unwrap_or_default();
            crate::adapters::annotate(&s, &mut own);
            own
        })
        .await
        .unwrap_or_default()
    };
    let me = service.endpoint().name().to_string();
    let mut out: Vec<ModelEntry> = own
        .into_iter()
        .map(|mut m| {
            if !m.download {
                m.holders = vec![me.clone()];
            }
            m
        })
        .collect();
    let takes = service.source().is_some_and(|s| s.peers_dir().is_some());
    for c in member_catalogs(service, false).await {
        for m in c.models {
            match out.iter_mut().find(|o| o.name == m.name) {
                Some(o) => {
                    if o.download {
                        // A member holds it: loading takes it from there.
                        o.download = false;
                        o.size_bytes = o.size_bytes.or(m.size_bytes);
                    }
                    o.facts = o.facts.take().or(m.facts);
                    o.adapter = o.adapter.take().or(m.adapter);
                    o.holders.push(c.name.clone());
                }
                // Listed only where a request naming it can be served.
                None if receivable(&m, takes) => out.push(ModelEntry {
                    holders: vec![c.name.clone()],
                    ..m
                }),
                None => {}
            }
        }
    }
    out
}

/// Loads the model named `name` on this device, in the background (events
/// tell how it went): from its own store when it holds it; else from the
/// members that hold it (`holders`, node ids, when the asker knew them;
/// else the members' catalogs say): they load it when asked too, and this
/// device receives what it needs from one once it serves it; else by
/// download, where the store can fetch it. Returns the holders found.
pub(crate) async fn load_or_adopt(
    service: &Service,
    name: &str,
    holders: &[String],
) -> Result<Vec<String>, RuntimeError> {
    use RuntimeError::{BadRequest, UnknownModel};
    if service.loading().as_deref() == Some(name) {
        // Already on its way.
        return Ok(holders.to_vec());
    }
    // Whatever this device was receiving before is not wanted now; its
    // task frees the loading slot within a poll.
    service.cancel_adopt();
    let freed = Instant::now() + 2 * ADOPT_POLL;
    while service.loading().is_some() && Instant::now() < freed {
        tokio::time::sleep(ADOPT_POLL / 10).await;
    }
    let source = service
        .source()
        .cloned()
        .ok_or_else(|| BadRequest("this node has no model store to load from".into()))?;
    let own = {
        let s = source.clone();
        tokio::task::spawn_blocking(move || s.list())
            .await
            .map_err(|e| BadRequest(e.to_string()))?
    };
    let mine = own.iter().find(|m| m.name == name);
    if mine.is_some_and(|m| !m.download) {
        service.load_listed(source, name)?;
        return Ok(Vec::new());
    }
    let me = service.me().to_string();
    let holders: Vec<String> = if holders.is_empty() {
        let catalogs = member_catalogs(service, true).await;
        let held: Vec<&MemberCatalog> = catalogs
            .iter()
            .filter(|c| c.models.iter().any(|m| m.name == name))
            .collect();
        // Only GGUF files travel between members, piece by piece.
        if !held.is_empty()
            && held.iter().all(|c| {
                c.models
                    .iter()
                    .any(|m| m.name == name && !receivable(m, true))
            })
        {
            let names: Vec<&str> = held.iter().map(|c| c.name.as_str()).collect();
            return Err(BadRequest(format!(
                "{name} is a model folder on {}; folders are not sent between members: copy it to this device, or ask a member that holds it",
                names.join(", ")
            )));
        }
        held.iter().map(|c| c.node_id.clone()).collect()
    } else {
        holders.iter().filter(|h| **h != me).cloned().collect()
    };
    if holders.is_empty() {
        return match mine {
            Some(_) => service.load_listed(source, name).map(|()| Vec::new()),
            None => Err(UnknownModel(name.to_string())),
        };
    }
    let dir = source.peers_dir().ok_or_else(|| {
        BadRequest(format!(
            "{name} is on other members, and this device loads only its own models"
        ))
    })?;
    service.claim_loading(name)?;
    let generation = service.adopt_generation();
    let (s, n, from) = (service.clone(), name.to_string(), holders.clone());
    tokio::spawn(async move {
        let result = adopt(&s, &n, &from, &dir, source, generation).await;
        s.loading_ended(&n, result.err());
    });
    Ok(holders)
}

/// Waits (at most 5 minutes, while no newer load or unload comes) for one
/// of `holders` to serve `name`, receives what measuring it needs,
/// measures this device on it and serves it.
async fn adopt(
    service: &Service,
    name: &str,
    holders: &[String],
    dir: &Path,
    source: std::sync::Arc<dyn crate::catalog::ModelSource>,
    generation: u64,
) -> Result<(), String> {
    let until = Instant::now() + ADOPT_WAIT;
    let wanted = |s: &Service| s.adopt_generation() == generation;
    let path = loop {
        if !wanted(service) {
            return Err(format!("loading {name} was called off"));
        }
        let tried = receive(service, Some((name, holders)), dir, &mut |_, _| {}).await;
        match tried {
            Ok(Some((path, _))) => break path,
            Ok(None) => {}
            // A holder that just switched away still looks like it
            // serves the model for a moment: try again.
            Err(e) => debug!("receiving {name}: {e}"),
        }
        if Instant::now() >= until {
            return Err(format!(
                "no member served {name} within {} s",
                ADOPT_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(ADOPT_POLL).await;
    };
    let mut info = tokio::task::spawn_blocking(move || source.measure_file(&path))
        .await
        .map_err(|e| e.to_string())??;
    if !wanted(service) {
        return Err(format!("loading {name} was called off"));
    }
    // Served under the id the cluster knows it by, not its copy's name.
    info.times.model = name.to_string();
    service.serve_model(info).map_err(|e| e.to_string())
}

/// Fills a partial copy (received from members) with the tensors of
/// `spec`, or every tensor (`None`), from the members that serve the same
/// content. A whole file is left as it is.
pub(crate) async fn complete(
    service: &Service,
    path: &Path,
    content: &str,
    spec: Option<hearth_models::StageSpec>,
) -> Result<(), String> {
    if crate::model_file::read_have(path).is_none() {
        return Ok(());
    }
    let p = path.to_path_buf();
    let needed = tokio::task::spawn_blocking(move || match spec {
        Some(spec) => crate::model_file::needed(&p, spec),
        None => crate::model_file::all_tensors(&p),
    })
    .await
    .map_err(|e| e.to_string())??;
    let sources = serving_members(service, |t| t.content.as_deref() == Some(content));
    crate::model_file::fetch(
        service.endpoint(),
        &sources,
        content,
        path,
        needed,
        &mut |_, _| {},
    )
    .await
}

/// The other members whose served model matches `pick`, as node ids.
fn serving_members(
    service: &Service,
    pick: impl Fn(&crate::profile::ModelTimes) -> bool,
) -> Vec<String> {
    let mut members: Vec<String> = service
        .endpoint()
        .peers()
        .iter()
        .map(|p| p.info().node_id.to_string())
        .collect();
    members.push(service.me().to_string());
    service
        .profiles()
        .snapshot(&members)
        .nodes
        .into_iter()
        .filter(|p| p.node_id != service.me() && p.model.as_ref().is_some_and(&pick))
        .map(|p| p.node_id)
        .collect()
}

/// Receives from the members that serve a model (`want`, or whichever one
/// is served) its header and the tensors a measurement reads, into a
/// sparse copy under `dir`. Returns the copy and the name the cluster
/// knows the model by, or `None` while no member serves it.
pub(crate) async fn receive(
    service: &Service,
    want: Option<(&str, &[String])>,
    dir: &Path,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Option<(PathBuf, String)>, RuntimeError> {
    let mut members: Vec<String> = service
        .endpoint()
        .peers()
        .iter()
        .map(|p| p.info().node_id.to_string())
        .collect();
    members.push(service.me().to_string());
    let profiles = service.profiles().snapshot(&members);
    // The holders' content (when the model is named): a copy another
    // member received, or a member that is no holder, is no source.
    let Some(times) = profiles
        .nodes
        .iter()
        .filter(|p| p.node_id != service.me())
        .filter(|p| want.is_none_or(|(_, holders)| holders.contains(&p.node_id)))
        .find_map(|p| {
            p.model
                .clone()
                .filter(|t| t.content.is_some() && want.is_none_or(|(name, _)| t.model == name))
        })
    else {
        return Ok(None);
    };
    let sources = serving_members(service, |t| t.content == times.content);
    let content = times.content.clone().unwrap_or_default();
    let dest = dir.join(
        crate::model_file::peer_file_name(&times.model, &content)
            .map_err(RuntimeError::BadRequest)?,
    );
    let ep = service.endpoint();
    // The header first (it names the tensors), then what measuring reads.
    crate::model_file::fetch(ep, &sources, &content, &dest, Default::default(), progress)
        .await
        .map_err(RuntimeError::BadRequest)?;
    let mut wanted = std::collections::BTreeSet::new();
    for spec in crate::model_file::measurement_spec() {
        wanted.extend(crate::model_file::needed(&dest, spec).map_err(RuntimeError::BadRequest)?);
    }
    crate::model_file::fetch(ep, &sources, &content, &dest, wanted, progress)
        .await
        .map_err(RuntimeError::BadRequest)?;
    info!(
        model = times.model,
        "received what measuring needs from members"
    );
    Ok(Some((dest, times.model)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ModelFacts;

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            size_bytes: Some(1),
            download: false,
            path: None,
            holders: Vec::new(),
            facts: None,
            adapter: None,
        }
    }

    #[test]
    fn a_member_catalog_is_bounded_and_well_formed_or_refused() {
        let ok = check_catalog(vec![entry("a"), entry("org/b:Q4_K_M")]).unwrap();
        assert_eq!(ok.len(), 2);
        // What a member says about who else holds a model is not taken.
        let mut claims = entry("c");
        claims.holders = vec!["someone".into()];
        assert!(check_catalog(vec![claims]).unwrap()[0].holders.is_empty());
        let many: Vec<ModelEntry> = (0..=MAX_CATALOG).map(|i| entry(&format!("m{i}"))).collect();
        assert!(check_catalog(many).unwrap_err().contains("at most"));
        for bad in ["", "  ", "a\nb", "x\u{1b}[2J", &"n".repeat(MAX_NAME + 1)] {
            assert!(check_catalog(vec![entry(bad)]).is_err(), "{bad:?} passed");
        }
        assert!(
            check_catalog(vec![entry("a"), entry("a")])
                .unwrap_err()
                .contains("twice")
        );
        let mut download = entry("d");
        download.download = true;
        assert!(check_catalog(vec![download]).is_err());
        let mut facts = entry("f");
        facts.facts = Some(ModelFacts {
            format: "gguf".into(),
            architecture: "x".repeat(MAX_NAME + 1),
            parameters: u64::MAX,
            quantization: "Q4_1".into(),
            digest: "sha256:00".into(),
        });
        assert!(check_catalog(vec![facts]).is_err());
    }
}
