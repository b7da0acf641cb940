//! The job's credential: a random token the operator puts in a Secret the job owns and
//! gives every trainer pod as `KUBETRAIN_JOB_TOKEN`. Every call that drives training
//! (Register, Heartbeat, Done, Shutdown, Push, Pull, and the pipeline stages' calls)
//! carries it as `authorization: Bearer <token>`, and the servers refuse a call without
//! it. The progress and health services stay open: they change nothing, and the operator,
//! which never reads a Secret, asks the chief for progress. The threat model is in
//! docs/deploy.md.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;

use crate::error::TrainerError;

/// The header a token travels in.
const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";
/// The operator issues 32 random bytes as 64 hex digits; shorter tokens are guessable.
const MIN_TOKEN_CHARS: usize = 32;

/// The job's token, or none (a trainer started by hand, outside the operator and
/// `kubetrain local`, which then accepts every call).
#[derive(Clone, Default)]
pub struct JobToken {
    /// `Bearer <token>`, ready to send and to compare.
    bearer: Option<Arc<AsciiMetadataValue>>,
}

impl std::fmt::Debug for JobToken {
    // Never print the token itself: configs are logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_set() {
            "JobToken(set)"
        } else {
            "JobToken(none)"
        })
    }
}

impl JobToken {
    /// No token: nothing is sent and nothing is checked.
    pub fn none() -> Self {
        Self::default()
    }

    /// The token from `KUBETRAIN_JOB_TOKEN`: visible ASCII, at least 32 characters.
    pub fn new(token: &str) -> Result<Self, TrainerError> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TrainerError::Config(format!(
                "KUBETRAIN_JOB_TOKEN: expected at least {MIN_TOKEN_CHARS} visible ASCII characters (the operator issues 64 hex digits from the job's Secret); got {} characters",
                token.chars().count()
            )));
        }
        let bearer = AsciiMetadataValue::try_from(format!("{SCHEME}{token}"))
            .map_err(|e| TrainerError::Config(format!("KUBETRAIN_JOB_TOKEN: {e}")))?;
        Ok(Self {
            bearer: Some(Arc::new(bearer)),
        })
    }

    pub fn is_set(&self) -> bool {
        self.bearer.is_some()
    }

    /// Adds the token to an outgoing request's headers.
    pub fn attach_to(&self, headers: &mut http::HeaderMap) {
        if let Some(bearer) = &self.bearer
            && let Ok(value) = http::HeaderValue::from_bytes(bearer.as_encoded_bytes())
        {
            headers.insert(HEADER, value);
        }
    }

    /// Whether an incoming call may drive the job. `presented` is its `authorization`
    /// header, if any. Compared in constant time, so its timing tells nothing of the token.
    pub fn check(&self, presented: Option<&[u8]>) -> Result<(), Status> {
        let Some(bearer) = &self.bearer else {
            return Ok(());
        };
        match presented {
            Some(p) if bool::from(p.ct_eq(bearer.as_encoded_bytes())) => Ok(()),
            Some(_) => Err(Status::unauthenticated(
                "wrong job token: only this job's own pods may call it (authorization: Bearer <KUBETRAIN_JOB_TOKEN>)",
            )),
            None => Err(Status::unauthenticated(
                "no job token: only this job's own pods may call it (authorization: Bearer <KUBETRAIN_JOB_TOKEN>)",
            )),
        }
    }

    /// [`Self::check`] on raw HTTP headers (the hand-framed transfer service).
    pub fn check_headers(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        self.check(headers.get(HEADER).map(http::HeaderValue::as_bytes))
    }

    fn check_metadata(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.check(
            metadata
                .get(HEADER)
                .map(AsciiMetadataValue::as_encoded_bytes),
        )
    }

    /// A client interceptor that sends the token with every call.
    pub fn attach(&self) -> Attach {
        Attach(self.clone())
    }

    /// A server interceptor that refuses calls without the token.
    pub fn require(&self) -> Require {
        Require(self.clone())
    }
}

/// See [`JobToken::attach`].
#[derive(Clone, Debug)]
pub struct Attach(JobToken);

impl Interceptor for Attach {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(bearer) = &self.0.bearer {
            request
                .metadata_mut()
                .insert(HEADER, AsciiMetadataValue::clone(bearer));
        }
        Ok(request)
    }
}

/// See [`JobToken::require`].
#[derive(Clone, Debug)]
pub struct Require(JobToken);

impl Interceptor for Require {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.0.check_metadata(request.metadata())?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_right_token_passes_and_any_other_is_refused_as_unauthenticated() {
        let token = JobToken::new(TOKEN).unwrap();
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            token.check_headers(&headers).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        token.attach_to(&mut headers);
        assert!(token.check_headers(&headers).is_ok());

        let other = JobToken::new(&TOKEN.replace('0', "1")).unwrap();
        let refused = other.check_headers(&headers).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("wrong job token"), "{refused:?}");
        // A bare token without the scheme is not the header's value.
        assert!(token.check(Some(TOKEN.as_bytes())).is_err());
    }

    #[test]
    fn interceptors_carry_the_token_from_client_to_server() {
        let token = JobToken::new(TOKEN).unwrap();
        let sent = token.attach().call(tonic::Request::new(())).unwrap();
        assert!(token.require().call(sent).is_ok());
        let bare = tonic::Request::new(());
        assert!(token.require().call(bare).is_err());
    }

    #[test]
    fn without_a_token_nothing_is_sent_or_checked() {
        let none = JobToken::none();
        let mut headers = http::HeaderMap::new();
        none.attach_to(&mut headers);
        assert!(headers.is_empty());
        assert!(none.check(None).is_ok());
    }

    #[test]
    fn a_short_or_non_ascii_token_is_refused_naming_the_variable() {
        for bad in ["", "short", &format!("{}é", &TOKEN[..40])] {
            let err = JobToken::new(bad).unwrap_err().to_string();
            assert!(err.contains("KUBETRAIN_JOB_TOKEN"), "{err}");
        }
        assert!(format!("{:?}", JobToken::new(TOKEN).unwrap()).contains("set"));
        assert!(!format!("{:?}", JobToken::new(TOKEN).unwrap()).contains(TOKEN));
    }
}
