//! Transactions and ranges: a builder for etcd transactions, and reading their answers.

use super::LeaseId;
use crate::etcd::pb::etcdserverpb as rpc;
use crate::etcd::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::etcd::pb::etcdserverpb::request_op::Request;
use crate::etcd::pb::mvccpb::KeyValue;

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A transaction being built.
#[derive(Debug, Default, Clone)]
pub struct Txn {
    pub(super) compare: Vec<rpc::Compare>,
    pub(super) success: Vec<rpc::RequestOp>,
    pub(super) failure: Vec<rpc::RequestOp>,
}

/// The outcome of a transaction.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The responses of the branch that ran.
    pub responses: Vec<rpc::ResponseOp>,
}

pub(super) fn cmp(
    key: Vec<u8>,
    target: CompareTarget,
    result: CompareResult,
    u: TargetUnion,
) -> rpc::Compare {
    rpc::Compare {
        result: result.into(),
        target: target.into(),
        key,
        range_end: Vec::new(),
        target_union: Some(u),
    }
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// The number of compares and operations, which etcd bounds (`--max-txn-ops`, 128 by
    /// default).
    pub fn size(&self) -> usize {
        self.compare.len() + self.success.len().max(self.failure.len())
    }

    /// Requires `key`'s mod revision to be `rev` (0: the key must not exist).
    pub fn if_mod_revision(mut self, key: Vec<u8>, rev: i64) -> Txn {
        self.compare.push(if rev == 0 {
            cmp(
                key,
                CompareTarget::Create,
                CompareResult::Equal,
                TargetUnion::CreateRevision(0),
            )
        } else {
            cmp(
                key,
                CompareTarget::Mod,
                CompareResult::Equal,
                TargetUnion::ModRevision(rev),
            )
        });
        self
    }

    /// Requires every key in `[key, range_end)` to have been created at or before revision
    /// `rev` (true of an empty range).
    pub fn if_none_created_after(mut self, key: Vec<u8>, range_end: Vec<u8>, rev: i64) -> Txn {
        let mut c = cmp(
            key,
            CompareTarget::Create,
            CompareResult::Less,
            TargetUnion::CreateRevision(rev + 1),
        );
        c.range_end = range_end;
        self.compare.push(c);
        self
    }

    /// Requires `key`'s create revision to be `rev` (0: absent).
    pub fn if_create_revision(mut self, key: Vec<u8>, rev: i64) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(rev),
        ));
        self
    }

    /// Requires `key` to exist (its create revision is not 0).
    pub fn if_exists(mut self, key: Vec<u8>) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Create,
            CompareResult::Greater,
            TargetUnion::CreateRevision(0),
        ));
        self
    }

    /// Requires `key` to be attached to `lease`.
    pub fn if_lease(mut self, key: Vec<u8>, lease: LeaseId) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Lease,
            CompareResult::Equal,
            TargetUnion::Lease(lease.0),
        ));
        self
    }

    /// Requires `key` not to be attached to `lease` (a missing key is on no lease).
    pub fn if_lease_not(mut self, key: Vec<u8>, lease: LeaseId) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Lease,
            CompareResult::NotEqual,
            TargetUnion::Lease(lease.0),
        ));
        self
    }

    /// Puts `key = value`, attached to `lease` (`None`: to none), when the compares hold.
    pub fn put(mut self, key: Vec<u8>, value: Vec<u8>, lease: Option<LeaseId>) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestPut(rpc::PutRequest {
                key,
                value,
                lease: lease.map_or(0, |l| l.0),
                ..Default::default()
            })),
        });
        self
    }

    /// Deletes `key` when the compares hold.
    pub fn delete(mut self, key: Vec<u8>) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key,
                ..Default::default()
            })),
        });
        self
    }

    /// Deletes every key in `[key, range_end)` when the compares hold.
    pub fn delete_range(mut self, key: Vec<u8>, range_end: Vec<u8>) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            })),
        });
        self
    }

    /// Reads `[key, range_end)` in the branch that runs (both, so a failed transaction still
    /// answers what it found).
    pub fn get(self, key: Vec<u8>, range_end: Vec<u8>) -> Txn {
        self.get_at(key, range_end, 0)
    }

    /// Reads `[key, range_end)` as it was at `revision` (0: the latest), in the branch that
    /// runs.
    pub fn get_at(mut self, key: Vec<u8>, range_end: Vec<u8>, revision: i64) -> Txn {
        let op = rpc::RequestOp {
            request: Some(Request::RequestRange(rpc::RangeRequest {
                key,
                range_end,
                revision,
                ..Default::default()
            })),
        };
        self.success.push(op.clone());
        self.failure.push(op);
        self
    }
}

impl Txn {
    /// A transaction of transactions (etcd 3.3 and later): each of `members` runs its own
    /// compares and the branch they choose, all in one request and at one revision. etcd
    /// evaluates every member's compares before any member writes, and refuses the whole
    /// when two members write one key: members must write disjoint keys and not depend on
    /// each other's writes.
    pub fn batch(members: Vec<Txn>) -> Txn {
        let mut t = Txn::new();
        for m in members {
            t.success.push(rpc::RequestOp {
                request: Some(Request::RequestTxn(rpc::TxnRequest {
                    compare: m.compare,
                    success: m.success,
                    failure: m.failure,
                })),
            });
        }
        t
    }
}

/// The members' results of a [`Txn::batch`]'s result, in order; `None` when etcd answered
/// something else.
pub fn batch_results(r: TxnResult, members: usize) -> Option<Vec<TxnResult>> {
    use crate::etcd::pb::etcdserverpb::response_op::Response;
    let out: Vec<TxnResult> = r
        .responses
        .into_iter()
        .filter_map(|op| match op.response {
            Some(Response::ResponseTxn(t)) => Some(TxnResult {
                succeeded: t.succeeded,
                revision: r.revision,
                responses: t.responses,
            }),
            _ => None,
        })
        .collect();
    (out.len() == members).then_some(out)
}

impl Txn {
    /// Reads `[key, range_end)` (or `key` alone when `range_end` is empty) when the compares
    /// fail: a failed transaction answers what it found, at its revision.
    pub fn or_get(mut self, key: Vec<u8>, range_end: Vec<u8>) -> Txn {
        self.failure.push(rpc::RequestOp {
            request: Some(Request::RequestRange(rpc::RangeRequest {
                key,
                range_end,
                ..Default::default()
            })),
        });
        self
    }

    /// [`Txn::size`] with `more` operations in the failure branch.
    pub fn size_with_failure(&self, more: usize) -> usize {
        self.compare.len() + self.success.len().max(self.failure.len() + more)
    }
}

/// The key-values of the `i`th response of a transaction, when it was a range.
pub fn range_of(r: &TxnResult, i: usize) -> &[KeyValue] {
    use crate::etcd::pb::etcdserverpb::response_op::Response;
    match r.responses.get(i).and_then(|op| op.response.as_ref()) {
        Some(Response::ResponseRange(rr)) => &rr.kvs,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
