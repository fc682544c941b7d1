//! ONNX Runtime for every ONNX model the engine serves: the shared library,
//! loaded once per process at run time (`scripts/models` extracts it from the
//! `onnxruntime` wheel), and the one way sessions are built.
//!
//! Not for: any one model's inputs and outputs (each model's file has those)
//! or choosing execution providers per model (with the `cuda` feature every
//! session asks for CUDA first; without it all run on CPU).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use super::ModelError;

/// The ONNX Runtime library under a models folder, as `scripts/models` lays it out.
const RUNTIME_IN_MODELS: &str = "onnxruntime/libonnxruntime.so.1.31.1";
/// The process's ONNX Runtime environment, once loaded.
static RUNTIME: Mutex<Option<Environment>> = Mutex::new(None);

/// Loads ONNX Runtime once per process from `dylib` (or ORT_DYLIB_PATH, or
/// models/onnxruntime/libonnxruntime.so.1.31.1 relative to the working dir /
/// CARGO_MANIFEST_DIR); idempotent; error (not panic) when missing.
///
/// In full, the library is looked for at: `dylib` when given; otherwise
/// `$ORT_DYLIB_PATH` when set; otherwise
/// `models/onnxruntime/libonnxruntime.so.1.31.1` under the working directory,
/// then under `$ONAIR_MODELS`, then under the source tree the crate was built
/// from. The first successful call wins: later calls return `Ok` without
/// loading anything, whatever `dylib` they name. A failed call loads nothing,
/// so it may be retried with another path. ONNX Runtime older than 1.31 is
/// refused.
pub fn init_onnx_runtime(dylib: Option<&Path>) -> Result<(), ModelError> {
    environment(dylib).map(drop)
}

/// The loaded environment, loading ONNX Runtime first when needed.
fn environment(dylib: Option<&Path>) -> Result<Environment, ModelError> {
    // A poisoned lock only means another thread panicked while loading; the
    // Option it guards is still either empty or a complete environment.
    let mut runtime = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = runtime.as_ref() {
        return Ok(env.clone());
    }
    let env_var = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty());
    let path = runtime_path(dylib, env_var.as_deref().map(Path::new))?;
    let missing = |reason: String| ModelError::Missing {
        path: path.display().to_string(),
        reason,
    };
    // ort resolves a relative path against the executable's folder first;
    // make it absolute so it means the working directory, as documented.
    let path =
        std::path::absolute(&path).map_err(|e| missing(format!("cannot resolve the path: {e}")))?;
    let env = ort::init_from(&path)
        .map_err(|e| missing(format!("cannot load ONNX Runtime: {e}")))?
        .with_name("onair")
        .with_telemetry(false)
        .build()
        .map_err(|e| ModelError::Runtime(format!("ONNX Runtime environment: {e}")))?;
    *runtime = Some(env.clone());
    Ok(env)
}

/// An ONNX Runtime session for `model` (loading the runtime first if this
/// process has not): all graph optimisations, `intra_threads` threads within
/// an operator, one across operators.
pub fn session(model: &Path, intra_threads: usize) -> Result<Session, ModelError> {
    let env = environment(None)?;
    let missing = |reason: String| ModelError::Missing {
        path: model.display().to_string(),
        reason,
    };
    if !model.is_file() {
        return Err(missing("not found".into()));
    }
    let runtime = |e: String| ModelError::Runtime(format!("ONNX Runtime session: {e}"));
    let builder = Session::builder(&env)
        .map_err(|e| runtime(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| runtime(e.to_string()))?
        .with_intra_threads(intra_threads.max(1))
        .map_err(|e| runtime(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| runtime(e.to_string()))?;
    // With the `cuda` feature, the CUDA provider first; ONNX Runtime falls
    // back to the CPU (with a warning) when its library is a CPU build or no
    // GPU is present.
    #[cfg(feature = "cuda")]
    let builder = builder
        .with_execution_providers([ort::ep::CUDA::default().build()])
        .map_err(|e| runtime(e.to_string()))?;
    let mut builder = builder;
    builder
        .commit_from_file(model)
        .map_err(|e| missing(format!("cannot load: {e}")))
}

/// Where to load ONNX Runtime from: `dylib`, else `env_var`
/// (`$ORT_DYLIB_PATH`), else the first existing default location.
fn runtime_path(dylib: Option<&Path>, env_var: Option<&Path>) -> Result<PathBuf, ModelError> {
    let chosen = dylib.or(env_var).map(Path::to_path_buf);
    let path = match chosen {
        Some(path) => path,
        None => {
            let mut places = models_dirs();
            places.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
            let places: Vec<PathBuf> = places
                .into_iter()
                .map(|dir| dir.join(RUNTIME_IN_MODELS))
                .collect();
            match places.iter().find(|p| p.is_file()) {
                Some(found) => found.clone(),
                None => {
                    let looked = places
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(ModelError::Missing {
                        path: RUNTIME_IN_MODELS.into(),
                        reason: format!(
                            "ONNX Runtime not found (looked at {looked}; ORT_DYLIB_PATH unset)"
                        ),
                    });
                }
            }
        }
    };
    if !path.is_file() {
        return Err(ModelError::Missing {
            path: path.display().to_string(),
            reason: "ONNX Runtime library not found".into(),
        });
    }
    Ok(path)
}

/// The models folders a deployed binary looks in, in order: `models/` under
/// the working directory, then `$ONAIR_MODELS` when set.
pub(crate) fn models_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("models")];
    if let Some(dir) = std::env::var_os("ONAIR_MODELS").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_runtime_is_an_error_not_a_panic() {
        let lib = Path::new("/nonexistent/onair/libonnxruntime.so");
        assert!(matches!(
            runtime_path(Some(lib), None),
            Err(ModelError::Missing { .. })
        ));
        assert!(matches!(
            runtime_path(None, Some(lib)),
            Err(ModelError::Missing { .. })
        ));
        // Once loaded, the runtime stays loaded whatever a later call names.
        init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
        init_onnx_runtime(Some(lib)).expect("idempotent");
    }
}
