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

/// Most models one member's catalog may list.
pub(crate) const MAX_CATALOG: usize = 1024;
/// Longest model name (and fact text) in a member's catalog, in bytes.
pub(crate) const MAX_NAME: usize = 256;
/// How long members' catalogs are reused before they are asked again.
const CATALOG_TTL: Duration = Duration::from_secs(2);
/// How long a member has to answer for its catalog.
pub(crate) const CATALOG_WAIT: Duration = Duration::from_secs(2);
/// How long a device loading a model from members waits for one of them
/// to serve it.
const ADOPT_WAIT: Duration = Duration::from_secs(300);
/// How often it looks while none does.
const ADOPT_POLL: Duration = Duration::from_millis(500);

/// One member's catalog.
#[derive(Debug, Clone)]
pub(crate) struct MemberCatalog {
    pub name: String,
    pub models: Vec<ModelEntry>,
}

/// Members' catalogs as last asked, and when (one fan-out at a time:
/// callers meanwhile wait for its answer).
pub(crate) type CatalogCache = tokio::sync::Mutex<Option<(Instant, Vec<MemberCatalog>)>>;

/// This device's catalog as members are told it: the models it holds (not
/// those it would have to download), each with its file's facts. Blocking.
pub(crate) fn own_catalog(service: &Service) -> Vec<ModelEntry> {
    let Some(source) = service.source() else {
        return Vec::new();
    };
    source
        .list()
        .into_iter()
        .filter(|m| !m.download)
        .take(MAX_CATALOG)
        .map(|mut m| {
            m.facts = m.path.as_deref().and_then(crate::catalog::model_facts);
            m
        })
        .filter(|m| check_entry(m).is_ok())
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
    if let Some(f) = &m.facts {
        for (what, s) in [
            ("a format", &f.format),
            ("an architecture", &f.architecture),
            ("a quantization", &f.quantization),
            ("a digest", &f.digest),
        ] {
            check_text(what, s)?;
        }
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

/// Every other member's catalog (asked at most every 2 s; a member that
/// does not answer in time, or answers badly, lists nothing).
pub(crate) async fn member_catalogs(service: &Service) -> Vec<MemberCatalog> {
    let mut cache = service.catalog_cache().lock().await;
    if let Some((at, c)) = cache.as_ref()
        && at.elapsed() < CATALOG_TTL
    {
        return c.clone();
    }
    let peers = service.endpoint().peers();
    let asks = peers.iter().map(|p| {
        let id = p.info().node_id.to_string();
        async move {
            crate::control::request(service, &id, &Control::CatalogRequest, CATALOG_WAIT).await
        }
    });
    let replies = futures_util::future::join_all(asks).await;
    let mut out = Vec::new();
    for (p, r) in peers.iter().zip(replies) {
        let name = p.info().name.clone();
        match r.map_err(|e| e.to_string()).and_then(|r| match r {
            Control::Catalog { models } => check_catalog(models),
            Control::Failed { reason, .. } => Err(reason),
            _ => Err("an unexpected reply".into()),
        }) {
            Ok(models) => out.push(MemberCatalog { name, models }),
            Err(e) => debug!("no catalog from {name}: {e}"),
        }
    }
    *cache = Some((Instant::now(), out.clone()));
    out
}

/// Every model the cluster can load by name: this device's own (those it
/// would download included), then those only members hold, each with the
/// members that hold it (`holders`, by name).
pub(crate) async fn cluster_models(service: &Service) -> Vec<ModelEntry> {
    let own = {
        let s = service.clone();
        tokio::task::spawn_blocking(move || s.source().map(|s| s.list()).unwrap_or_default())
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
    for c in member_catalogs(service).await {
        for m in c.models {
            match out.iter_mut().find(|o| o.name == m.name) {
                Some(o) => {
                    if o.download {
                        // A member holds it: loading takes it from there.
                        o.download = false;
                        o.size_bytes = o.size_bytes.or(m.size_bytes);
                    }
                    o.facts = o.facts.take().or(m.facts);
                    o.holders.push(c.name.clone());
                }
                None => out.push(ModelEntry {
                    holders: vec![c.name.clone()],
                    ..m
                }),
            }
        }
    }
    out
}

/// Loads the model named `name` on this device, in the background (events
/// tell how it went): from its own store when it holds it; else from the
/// members that hold it (they load it when asked too, and this device
/// receives what it needs from one once it serves it); else by download,
/// where the store can fetch it.
pub(crate) async fn load_or_adopt(service: &Service, name: &str) -> Result<(), RuntimeError> {
    use RuntimeError::{BadRequest, UnknownModel};
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
        return service.load_model(name);
    }
    let holders: Vec<MemberCatalog> = member_catalogs(service)
        .await
        .into_iter()
        .filter(|c| c.models.iter().any(|m| m.name == name))
        .collect();
    if holders.is_empty() {
        return match mine {
            Some(_) => service.load_model(name),
            None => Err(UnknownModel(name.to_string())),
        };
    }
    // Only GGUF files travel between members, piece by piece.
    let folder = |c: &MemberCatalog| {
        c.models
            .iter()
            .any(|m| m.name == name && m.facts.as_ref().is_some_and(|f| f.format != "gguf"))
    };
    if holders.iter().all(folder) {
        let names: Vec<&str> = holders.iter().map(|c| c.name.as_str()).collect();
        return Err(BadRequest(format!(
            "{name} is a model folder on {}; folders are not sent between members: copy it to this device, or ask a member that holds it",
            names.join(", ")
        )));
    }
    let dir = source.peers_dir().ok_or_else(|| {
        BadRequest(format!(
            "{name} is on other members, and this device loads only its own models"
        ))
    })?;
    service.claim_loading(name)?;
    let (s, name) = (service.clone(), name.to_string());
    tokio::spawn(async move {
        let result = adopt(&s, &name, &dir, source).await;
        s.loading_ended(&name, result.err());
    });
    Ok(())
}

/// Waits (at most 5 minutes) for a member to serve `name`, receives what
/// measuring it needs, measures this device on it and serves it.
async fn adopt(
    service: &Service,
    name: &str,
    dir: &Path,
    source: std::sync::Arc<dyn crate::catalog::ModelSource>,
) -> Result<(), String> {
    let until = Instant::now() + ADOPT_WAIT;
    let path = loop {
        match receive(service, Some(name), dir, &mut |_, _| {}).await {
            Ok(Some((path, _))) => break path,
            Ok(None) if Instant::now() < until => tokio::time::sleep(ADOPT_POLL).await,
            Ok(None) => {
                return Err(format!(
                    "no member served {name} within {} s",
                    ADOPT_WAIT.as_secs()
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut info = tokio::task::spawn_blocking(move || source.measure_file(&path))
        .await
        .map_err(|e| e.to_string())??;
    // Served under the id the cluster knows it by, not its copy's name.
    info.times.model = name.to_string();
    service.serve_model(info).map_err(|e| e.to_string())
}

/// Receives from the members that serve a model (`want`, or whichever one
/// is served) its header and the tensors a measurement reads, into a
/// sparse copy under `dir`. Returns the copy and the name the cluster
/// knows the model by, or `None` while no member serves it.
pub(crate) async fn receive(
    service: &Service,
    want: Option<&str>,
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
    let Some((times, sources)) = profiles
        .nodes
        .iter()
        .filter(|p| p.node_id != service.me())
        .find_map(|p| {
            p.model
                .clone()
                .filter(|t| t.content.is_some() && want.is_none_or(|w| t.model == w))
        })
        .map(|t| {
            let holders: Vec<String> = profiles
                .nodes
                .iter()
                .filter(|p| p.node_id != service.me())
                .filter(|p| p.model.as_ref().is_some_and(|m| m.content == t.content))
                .map(|p| p.node_id.clone())
                .collect();
            (t, holders)
        })
    else {
        return Ok(None);
    };
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
