//! Pods that opted out of socket-level translation: their cgroups, found by
//! pod UID, are written to the socket programs' opt-out map.

use std::{collections::BTreeSet, path::Path};

use tracing::{error, info};

use crate::{kernel::socket_programs::SocketPrograms, node::cgroups};

/// Pods that opted out of socket translation, and whether the map is known
/// to be empty.
#[derive(Default)]
pub struct OptOut {
    /// UIDs of this node's pods that opted out.
    pub pods: BTreeSet<String>,
    /// The map is known to be empty: nothing to walk or write while no pod
    /// opts out.
    cleared: bool,
}

impl OptOut {
    /// Writes the cgroup ids of the opted-out pods (below `cgroup_root`)
    /// into the map. Containers of such pods may start after their pod's
    /// snapshot, so this runs on every pass of the main loop.
    pub fn refresh(&mut self, cgroup_root: &Path, programs: &mut SocketPrograms) {
        if self.pods.is_empty() && self.cleared {
            return;
        }
        let ids = match cgroups::cgroup_ids(cgroup_root, &self.pods) {
            Ok(ids) => ids,
            Err(err) => {
                error!(error = %err, "finding the cgroups of opted-out pods");
                return;
            }
        };
        match programs.set_opt_out(&ids) {
            Ok(changed) => {
                if changed {
                    info!(
                        cgroups = ids.len(),
                        "cgroups opted out of socket translation"
                    );
                }
                self.cleared = ids.is_empty();
            }
            Err(err) => error!(error = %err, "writing the opted-out cgroups"),
        }
    }
}
