//! ONNX Runtime, loaded at run time from the shared library of the PyPI `onnxruntime` wheel
//! (`scripts/setup-onnx.sh` puts it and the models in `.cache/onnx/`).
//!
//! - One ONNX Runtime environment per process, created on first use and never dropped: ONNX
//!   Runtime refuses a second one, even after the first is gone.
//! - Sessions are per thread ([`with_session`]): `Session::run` needs `&mut`, and the evaluation
//!   pool gives each of its threads its own session, so inference takes no lock.
//! - Nothing here panics when the library or a model is missing: the error says what is
//!   missing and where it was looked for, so the gateway can start without the evaluators.
//!
//! Where things are looked for:
//! - the models directory: `$ACC_MODELS_DIR`, else `.cache/onnx` under the current directory,
//!   else `.cache/onnx` under the directory the crate was built from;
//! - the library: `$ACC_ORT_DYLIB`, else `libonnxruntime.so.1.31.1` in the models directory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;

/// File name of the ONNX Runtime library that `scripts/setup-onnx.sh` fetches.
pub const ORT_LIB_FILE: &str = "libonnxruntime.so.1.31.1";
/// The environment variable naming the models directory.
pub const MODELS_DIR_ENV: &str = "ACC_MODELS_DIR";
/// The environment variable naming the ONNX Runtime library file.
pub const ORT_DYLIB_ENV: &str = "ACC_ORT_DYLIB";

const DEFAULT_DIR: &str = ".cache/onnx";

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// Where models (and, by default, the ONNX Runtime library) are: `$ACC_MODELS_DIR`, else
/// `./.cache/onnx` when it exists, else `.cache/onnx` in the source tree this crate was built
/// from when that exists, else `./.cache/onnx` (which does not exist: errors then name it).
/// Always an absolute path, so that messages say exactly where we looked.
pub fn models_dir() -> PathBuf {
    models_dir_and_origin().0
}

/// [`models_dir`] and, in words, why it is that one (for error messages).
fn models_dir_and_origin() -> (PathBuf, String) {
    if let Some(dir) = env_path(MODELS_DIR_ENV) {
        return (absolute(dir), format!("${MODELS_DIR_ENV}"));
    }
    let local = absolute(PathBuf::from(DEFAULT_DIR));
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_DIR);
    let tried = format!("${MODELS_DIR_ENV} unset; tried {} then {}", local.display(), built.display());
    if local.is_dir() {
        return (local, format!("${MODELS_DIR_ENV} unset, ./{DEFAULT_DIR}"));
    }
    if built.is_dir() {
        return (built, format!("${MODELS_DIR_ENV} unset and no ./{DEFAULT_DIR}, so the source tree's"));
    }
    (local, tried)
}

/// The ONNX Runtime library file: `$ACC_ORT_DYLIB`, else [`ORT_LIB_FILE`] in [`models_dir`].
pub fn ort_dylib_path() -> PathBuf {
    match env_path(ORT_DYLIB_ENV) {
        Some(p) => absolute(p),
        None => models_dir().join(ORT_LIB_FILE),
    }
}

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());
static INTRA_THREADS: AtomicUsize = AtomicUsize::new(1);

/// Sets the intra-op thread count of sessions created from now on (default 1: on a small box,
/// more threads per session spin against each other under load; parallelism comes from the
/// evaluation pool instead). Sessions already created keep theirs.
pub fn set_intra_threads(n: usize) {
    INTRA_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Loads ONNX Runtime and creates the process's environment, once. `Ok` when it is ready;
/// otherwise the error says what is missing and where it looked. A failure is not cached:
/// a later call tries again (e.g. after `scripts/setup-onnx.sh` has been run).
pub fn runtime() -> Result<(), String> {
    environment().map(|_| ())
}

fn environment() -> Result<&'static Environment, String> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = ort_dylib_path();
    if !path.is_file() {
        let how = if env_path(ORT_DYLIB_ENV).is_some() {
            format!("the path is ${ORT_DYLIB_ENV}")
        } else {
            format!("${ORT_DYLIB_ENV} unset, so {ORT_LIB_FILE} in the models directory: {}", models_dir_and_origin().1)
        };
        return Err(format!(
            "ONNX Runtime library not found: {} does not exist ({how}); run scripts/setup-onnx.sh, or set ${ORT_DYLIB_ENV} to an ONNX Runtime >= 1.31 library",
            path.display()
        ));
    }
    // ort's loader has a few `expect`s on impossible paths; keep even those from unwinding into
    // the caller.
    let built = std::panic::catch_unwind(|| -> Result<Environment, String> {
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?;
        builder
            .with_name("acc")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment (library {}): {e}", path.display()))
    })
    .map_err(|_| format!("loading ONNX Runtime from {} panicked", path.display()))??;
    Ok(ENVIRONMENT.get_or_init(|| built))
}

thread_local! {
    static SESSIONS: RefCell<HashMap<PathBuf, Session>> = RefCell::new(HashMap::new());
}

fn build_session(env: &Environment, model: &Path) -> Result<Session, String> {
    if !model.is_file() {
        return Err(format!(
            "model file not found: {} does not exist; run scripts/setup-onnx.sh",
            absolute(model.to_path_buf()).display()
        ));
    }
    let threads = INTRA_THREADS.load(Ordering::Relaxed);
    let err = |e: &dyn std::fmt::Display| format!("cannot load model {}: {e}", model.display());
    Session::builder(env)
        .map_err(|e| err(&e))?
        .with_intra_threads(threads)
        .map_err(|e| err(&e))?
        .with_inter_threads(1)
        .map_err(|e| err(&e))?
        .commit_from_file(model)
        .map_err(|e| err(&e))
}

/// Runs `f` with this thread's session for `model`, creating it on first use (ONNX Runtime is
/// loaded then too). Sessions are kept per thread, keyed by the path as given, for the life of
/// the thread. `f` may itself call `with_session` (for another model, or even the same one,
/// which then gets a second session). Errors name the missing library or model file.
pub fn with_session<R>(model: &Path, f: impl FnOnce(&mut Session) -> Result<R, String>) -> Result<R, String> {
    let env = environment()?;
    let cached = SESSIONS.with(|s| s.borrow_mut().remove(model));
    let mut session = match cached {
        Some(session) => session,
        None => build_session(env, model)?,
    };
    let result = f(&mut session);
    SESSIONS.with(|s| s.borrow_mut().insert(model.to_path_buf(), session));
    result
}

/// Whether this thread already holds a session for `model` (for tests and diagnostics).
pub fn has_session(model: &Path) -> bool {
    SESSIONS.with(|s| s.borrow().contains_key(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dylib_path_is_absolute_and_named() {
        let p = ort_dylib_path();
        assert!(p.is_absolute(), "{}", p.display());
        assert!(models_dir().is_absolute());
    }
}
