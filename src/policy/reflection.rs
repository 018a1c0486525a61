//! Descriptors from the upstream's own gRPC server reflection (`--reflection`): v1 first,
//! then v1alpha, retried until the service is up or the deadline passes. Files are kept as
//! the encoded bytes the service sent, so custom options (our annotations) survive.

use super::PolicyError;
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Files fetched in one round, at most: a bound on what a misbehaving service can make us
/// hold.
const FILES_MAX: usize = 4_096;

/// Pause between two attempts while the service is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

fn failed(problem: impl std::fmt::Display) -> PolicyError {
    PolicyError {
        subject: "--reflection".into(),
        problem: problem.to_string(),
    }
}

/// Fetches every service's files (with their imports) from `upstream` (`http://host:port`)
/// as one encoded FileDescriptorSet.
pub async fn fetch(upstream: &str, deadline: Duration) -> Result<Vec<u8>, PolicyError> {
    let until = Instant::now() + deadline;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let error = match tokio::time::timeout_at(until, fetch_once(upstream)).await {
            Ok(Ok(files)) => return Ok(encode_set(&files)),
            Ok(Err(error)) => error,
            Err(_) => format!("no answer within {}", humantime::format_duration(deadline)),
        };
        if Instant::now() + RETRY_PAUSE >= until {
            return Err(failed(format!(
                "the service's reflection did not answer after {attempt} attempts: {error}"
            )));
        }
        tracing::info!(attempt, %error, "waiting for the service's reflection");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn fetch_once(upstream: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let channel = tonic::transport::Endpoint::from_shared(upstream.to_owned())
        .map_err(|error| error.to_string())?
        .connect()
        .await
        .map_err(|error| format!("cannot connect: {error}"))?;
    match v1::fetch(channel.clone()).await {
        Ok(files) => files,
        Err(Unimplemented) => match v1alpha::fetch(channel).await {
            Ok(files) => files,
            Err(Unimplemented) => {
                Err("the service serves neither reflection v1 nor v1alpha".into())
            }
        },
    }
}

/// The service does not serve this reflection version.
struct Unimplemented;

/// The files' names and imports, read without keeping the decoded copy (it would drop
/// custom options).
fn name_and_imports(raw: &[u8]) -> Result<(String, Vec<String>), String> {
    let file = prost_types::FileDescriptorProto::decode(raw)
        .map_err(|error| format!("the service sent an undecodable file: {error}"))?;
    Ok((file.name.unwrap_or_default(), file.dependency))
}

fn encode_set(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    // FileDescriptorSet { repeated FileDescriptorProto file = 1; }, each file's bytes as sent.
    let mut out = Vec::new();
    for raw in files.values() {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(raw.len() as u64, &mut out);
        out.extend_from_slice(raw);
    }
    out
}

/// One reflection version's client; v1 and v1alpha are the same protocol in two packages.
macro_rules! reflection_client {
    ($version:ident) => {
        mod $version {
            use super::{name_and_imports, Unimplemented, FILES_MAX};
            use pb::server_reflection_client::ServerReflectionClient;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            use pb::ServerReflectionRequest;
            use std::collections::BTreeMap;
            use tonic_reflection::pb::$version as pb;

            type Client = ServerReflectionClient<tonic::transport::Channel>;

            async fn ask(
                client: &mut Client,
                request: MessageRequest,
            ) -> Result<Result<MessageResponse, String>, Unimplemented> {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let answered = client
                    .server_reflection_info(futures_util::stream::iter([request]))
                    .await;
                let mut responses = match answered {
                    Ok(responses) => responses.into_inner(),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        return Err(Unimplemented)
                    }
                    Err(status) => return Ok(Err(status.to_string())),
                };
                let response = match responses.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => return Ok(Err("the reflection stream ended with no answer".into())),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        return Err(Unimplemented)
                    }
                    Err(status) => return Ok(Err(status.to_string())),
                };
                Ok(match response.message_response {
                    Some(MessageResponse::ErrorResponse(error)) => Err(format!(
                        "reflection error {}: {}",
                        error.error_code, error.error_message
                    )),
                    Some(answer) => Ok(answer),
                    None => Err("an empty reflection answer".into()),
                })
            }

            /// Every service's files and their imports, by file name.
            pub(super) async fn fetch(
                channel: tonic::transport::Channel,
            ) -> Result<Result<BTreeMap<String, Vec<u8>>, String>, Unimplemented> {
                let mut client = ServerReflectionClient::new(channel);
                let services =
                    match ask(&mut client, MessageRequest::ListServices(String::new())).await? {
                        Ok(MessageResponse::ListServicesResponse(list)) => list.service,
                        Ok(_) => return Ok(Err("an unexpected answer to ListServices".into())),
                        Err(error) => return Ok(Err(error)),
                    };
                let mut files = BTreeMap::new();
                let mut wanted: Vec<MessageRequest> = services
                    .into_iter()
                    .filter(|service| !service.name.starts_with("grpc.reflection."))
                    .map(|service| MessageRequest::FileContainingSymbol(service.name))
                    .collect();
                while let Some(request) = wanted.pop() {
                    let raws = match ask(&mut client, request).await? {
                        Ok(MessageResponse::FileDescriptorResponse(found)) => {
                            found.file_descriptor_proto
                        }
                        Ok(_) => return Ok(Err("an unexpected answer to a file request".into())),
                        Err(error) => return Ok(Err(error)),
                    };
                    for raw in raws {
                        let (name, imports) = match name_and_imports(&raw) {
                            Ok(found) => found,
                            Err(error) => return Ok(Err(error)),
                        };
                        for import in imports {
                            if !files.contains_key(&import) {
                                wanted.push(MessageRequest::FileByFilename(import));
                            }
                        }
                        files.insert(name, raw);
                    }
                    if files.len() > FILES_MAX {
                        return Ok(Err(format!("the service has more than {FILES_MAX} files")));
                    }
                }
                Ok(Ok(files))
            }
        }
    };
}

reflection_client!(v1);
reflection_client!(v1alpha);
