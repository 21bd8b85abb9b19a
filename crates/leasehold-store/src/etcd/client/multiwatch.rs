//! Many watchers on one watch stream: each created and cancelled by its own id, their
//! responses told apart by it (etcd 3.4's `watch_id`).

use super::{Etcd, EtcdError, authed};
use crate::etcd::pb::etcdserverpb as rpc;

/// What one watcher watches: `[key, range_end)` from `start_revision`.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Its id on the stream: unique for the stream's life, above 0.
    pub id: i64,
    /// The first key.
    pub key: Vec<u8>,
    /// The end of the range; empty for the one key.
    pub range_end: Vec<u8>,
    /// The first revision whose events are sent.
    pub start_revision: i64,
    /// Whether its events carry the key's previous value.
    pub prev_kv: bool,
}

/// Creates and cancels watchers on one stream. Sending never waits; a closed stream makes
/// every send a no-op (its reader then sees the stream end and opens another).
#[derive(Debug, Clone)]
pub struct WatchSender(
    tokio::sync::mpsc::UnboundedSender<rpc::WatchRequest>,
    /// The token the stream was opened with: etcd checks it for every watcher created on it.
    Option<tonic::metadata::AsciiMetadataValue>,
);

impl WatchSender {
    /// Creates watcher `spec.id`; etcd answers `created` (or `canceled`, with why).
    pub fn create(&self, spec: &WatchSpec) {
        let _ = self.0.send(create_request(spec));
    }

    /// Cancels watcher `id`: no more of its events are sent.
    pub fn cancel(&self, id: i64) {
        let _ = self.0.send(rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CancelRequest(
                rpc::WatchCancelRequest { watch_id: id },
            )),
        });
    }
}

fn create_request(spec: &WatchSpec) -> rpc::WatchRequest {
    rpc::WatchRequest {
        request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
            rpc::WatchCreateRequest {
                key: spec.key.clone(),
                range_end: spec.range_end.clone(),
                start_revision: spec.start_revision,
                prev_kv: spec.prev_kv,
                watch_id: spec.id,
                ..Default::default()
            },
        )),
    }
}

impl Etcd {
    /// Opens a watch stream with `first` on it (etcd answers a stream only once it carries a
    /// watcher); more are created and cancelled with the returned sender. The stream's
    /// responses each name their watcher.
    ///
    /// # Errors
    /// An [`EtcdError`] when the stream cannot be opened.
    pub async fn watch_many(
        &self,
        first: &WatchSpec,
    ) -> Result<(WatchSender, tonic::Streaming<rpc::WatchResponse>), EtcdError> {
        let token = self.token().await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(create_request(first));
        let sender = WatchSender(tx.clone(), token.clone());
        let stream = self
            .watch
            .clone()
            .watch(authed(
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                token.as_ref(),
            ))
            .await
            .map_err(|s| EtcdError::from_status("watch", &s))?
            .into_inner();
        Ok((sender, stream))
    }

    /// etcd refused a watcher on `tx`'s stream for its rights: the token the stream was opened
    /// with may be one etcd has dropped since (unused for `--auth-token-ttl`, or auth turned
    /// off and on). It is forgotten, so the next stream opens with a fresh one (unless another
    /// call already authenticated again).
    pub async fn forget_watch_token(&self, tx: &WatchSender) {
        self.forget_token(tx.1.as_ref()).await;
    }
}
