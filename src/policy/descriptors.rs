//! Where the service's descriptors come from: descriptor set files (`protoc
//! --include_imports --descriptor_set_out`, `buf build`) and .proto sources compiled in
//! process (protox; no protoc needed). Custom options are kept: both routes go through
//! prost-reflect, which decodes options with the extensions the pool knows.

use super::PolicyError;
use prost_reflect::DescriptorPool;
use std::path::{Path, PathBuf};

/// The bundled `idemproxy/v1/annotations.proto`, so .proto sources can import it without
/// copying it into their include path.
const ANNOTATIONS_PROTO: &str = include_str!("../../proto/idemproxy/v1/annotations.proto");
/// Its import path.
const ANNOTATIONS_NAME: &str = "idemproxy/v1/annotations.proto";

/// The descriptor sources named by the settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// FileDescriptorSet files.
    pub descriptor_sets: Vec<PathBuf>,
    /// .proto files to compile.
    pub protos: Vec<PathBuf>,
    /// Include directories for `protos`.
    pub proto_paths: Vec<PathBuf>,
    /// Also ask the service's own server reflection.
    pub reflection: bool,
    /// How long to wait for the service's reflection to answer at start.
    pub reflection_timeout: std::time::Duration,
}

impl Sources {
    /// True when no descriptors are configured (header-keyed dedup only).
    pub fn is_empty(&self) -> bool {
        self.descriptor_sets.is_empty() && self.protos.is_empty() && !self.reflection
    }
}

fn failed(subject: &Path, problem: impl std::fmt::Display) -> PolicyError {
    PolicyError {
        subject: subject.display().to_string(),
        problem: problem.to_string(),
    }
}

/// Loads every configured source into one pool, with `reflected` (the FileDescriptorSet the
/// service's reflection sent, fetched by the caller). Blocking (reads files).
pub fn load(sources: &Sources, reflected: Option<&[u8]>) -> Result<DescriptorPool, PolicyError> {
    let mut pool = DescriptorPool::new();
    if let Some(bytes) = reflected {
        pool.decode_file_descriptor_set(bytes)
            .map_err(|error| PolicyError {
                subject: "--reflection".into(),
                problem: format!("the service's descriptors do not load: {error}"),
            })?;
    }
    for path in &sources.descriptor_sets {
        let bytes = crate::files::read(path, crate::files::DESCRIPTORS_BYTES_MAX)
            .map_err(|error| failed(path, error))?;
        pool.decode_file_descriptor_set(&bytes[..])
            .map_err(|error| failed(path, format!("not a usable FileDescriptorSet: {error}")))?;
    }
    if !sources.protos.is_empty() {
        let compiled = compile(&sources.protos, &sources.proto_paths)?;
        pool.decode_file_descriptor_set(&compiled[..])
            .map_err(|error| {
                failed(
                    &sources.protos[0],
                    format!("compiled descriptors do not load: {error}"),
                )
            })?;
    }
    Ok(pool)
}

/// Serves the bundled annotations file by its import path.
struct BundledAnnotations;

impl protox::file::FileResolver for BundledAnnotations {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == ANNOTATIONS_NAME {
            protox::file::File::from_source(name, ANNOTATIONS_PROTO)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn compile(protos: &[PathBuf], proto_paths: &[PathBuf]) -> Result<Vec<u8>, PolicyError> {
    let subject = &protos[0];
    let mut resolver = protox::file::ChainFileResolver::new();
    for dir in proto_paths {
        resolver.add(protox::file::IncludeFileResolver::new(dir.clone()));
    }
    resolver.add(BundledAnnotations);
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    for proto in protos {
        // protox names files relative to an include path; a file outside every include
        // path is named by its own path.
        let name = proto_paths
            .iter()
            .find_map(|dir| proto.strip_prefix(dir).ok())
            .unwrap_or(proto);
        compiler
            .open_file(name)
            .map_err(|error| failed(proto, format!("does not compile: {error}")))?;
    }
    let _ = subject;
    Ok(compiler.encode_file_descriptor_set())
}
