//! Membership administration (add a learner, change voters), status, and the admin client a
//! member uses to reach the leader or its join target.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use flotilla_api::v1;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tonic::transport::Channel;

use crate::node::StoreNode;
use crate::transport::Transport;
use crate::types::NodeId;

/// An admin client for the member at `addr`, reached through `transport`.
pub(crate) async fn admin_client(
    transport: &dyn Transport,
    addr: &str,
) -> Result<v1::store_admin_client::StoreAdminClient<Channel>, String> {
    let channel = transport.channel(addr).map_err(|e| e.to_string())?;
    Ok(v1::store_admin_client::StoreAdminClient::new(channel))
}

impl StoreNode {
    /// Current members: id → (address, is voter).
    pub fn members(&self) -> BTreeMap<NodeId, (String, bool)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        mem.nodes()
            .map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id))))
            .collect()
    }

    /// Adds a learner (on the leader; a follower forwards).
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<u64, AdminError> {
        if id == 0 {
            return Err(AdminError::Invalid {
                field: "node_id".into(),
                reason: "must be >= 1".into(),
            });
        }
        if addr.is_empty() || addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
            return Err(AdminError::Invalid {
                field: "addr".into(),
                reason: format!("{addr:?} is not host:port"),
            });
        }
        match self
            .inner
            .raft
            .add_learner(id, BasicNode::new(addr.clone()), true)
            .await
        {
            Ok(r) => Ok(r.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let r = self
                    .leader_admin(&f)
                    .await?
                    .add_learner(v1::AddLearnerRequest { node_id: id, addr })
                    .await
                    .map_err(AdminError::Remote)?;
                Ok(r.into_inner().log_index)
            }
            Err(e) => Err(AdminError::Unavailable(e.to_string())),
        }
    }

    /// Promotes learners and removes members (on the leader; a follower forwards).
    pub async fn change_membership(
        &self,
        add_voters: Vec<NodeId>,
        remove: Vec<NodeId>,
    ) -> Result<u64, AdminError> {
        let members = self.members();
        for (i, id) in add_voters.iter().enumerate() {
            if !members.contains_key(id) {
                return Err(AdminError::Invalid {
                    field: format!("add_voters[{i}]"),
                    reason: format!("node {id} is not a member; add it as a learner first"),
                });
            }
        }
        for (i, id) in remove.iter().enumerate() {
            if !members.contains_key(id) {
                return Err(AdminError::Invalid {
                    field: format!("remove[{i}]"),
                    reason: format!("node {id} is not a member"),
                });
            }
        }
        let voters_after: BTreeSet<NodeId> = members
            .iter()
            .filter(|(id, (_, v))| (*v || add_voters.contains(id)) && !remove.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if voters_after.is_empty() {
            return Err(AdminError::Invalid {
                field: "remove".into(),
                reason: "would leave the cluster without voters".into(),
            });
        }
        let request = v1::ChangeMembershipRequest {
            add_voters: add_voters.clone(),
            remove: remove.clone(),
        };
        let leader_forward = |f: ForwardToLeader<NodeId, BasicNode>| async move {
            let r = self
                .leader_admin(&f)
                .await?
                .change_membership(request)
                .await
                .map_err(AdminError::Remote)?;
            Ok(r.into_inner().log_index)
        };
        let mut last = 0;
        let remove_learners: BTreeSet<NodeId> = remove
            .iter()
            .copied()
            .filter(|id| !members.get(id).is_some_and(|(_, v)| *v))
            .collect();
        let steps = [
            (!voters_after.is_empty())
                .then(|| ChangeMembers::ReplaceAllVoters(voters_after.clone())),
            (!remove_learners.is_empty())
                .then(|| ChangeMembers::RemoveNodes(remove_learners.clone())),
        ];
        for change in steps.into_iter().flatten() {
            match self.inner.raft.change_membership(change, false).await {
                Ok(r) => last = r.log_id.index,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return leader_forward(f).await;
                }
                Err(e) => return Err(AdminError::Unavailable(e.to_string())),
            }
        }
        Ok(last)
    }

    /// This member's status.
    pub fn status(&self) -> v1::StatusResponse {
        let m = self.inner.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let (revision, compact_revision) = self.inner.reader.revisions().unwrap_or((0, 0));
        let leader = self.leader();
        v1::StatusResponse {
            node_id: self.inner.id,
            cluster_id: self.cluster_id().unwrap_or_default(),
            role: role.into(),
            leader_id: leader.as_ref().map_or(0, |l| l.0),
            leader_addr: leader.map(|l| l.1).unwrap_or_default(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            revision,
            compact_revision,
            members: self.wire_members(),
        }
    }

    /// Current members as wire messages.
    pub(crate) fn wire_members(&self) -> Vec<v1::Member> {
        self.members()
            .into_iter()
            .map(|(node_id, (addr, voter))| v1::Member {
                node_id,
                addr,
                voter,
            })
            .collect()
    }

    /// An admin client for the leader named in `f`.
    async fn leader_admin(
        &self,
        f: &ForwardToLeader<NodeId, BasicNode>,
    ) -> Result<v1::store_admin_client::StoreAdminClient<tonic::transport::Channel>, AdminError>
    {
        let (_, leader) = self
            .forward_target(f)
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        admin_client(&*self.inner.net.transport, &leader)
            .await
            .map_err(AdminError::Unavailable)
    }
}

/// Errors of membership administration.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input, with the field named.
    #[error("invalid argument: {field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No leader, or the change could not be made now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The leader refused the forwarded request.
    #[error("leader: {0}")]
    Remote(tonic::Status),
}
