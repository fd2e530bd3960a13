//! Kubernetes Events on the Services the agent cannot program (a full map):
//! `kubectl describe service` shows why. The main loop hands events to a
//! bounded queue without waiting; a task on the API source's runtime
//! publishes them with kube-rs's `Recorder`, which folds repeats into a
//! series. With a YAML directory as the source there is no API to write to
//! and the queue is absent.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};
use tokio::sync::mpsc;
use tracing::warn;

/// Events waiting to be published, at most; more are dropped (and logged).
const QUEUE: usize = 64;

/// A Warning event about one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service's uid, so that `kubectl describe` finds the event.
    pub uid: Option<String>,
    /// A `PascalCase` reason.
    pub reason: &'static str,
    /// What happened, for people.
    pub note: String,
}

/// The main loop's end of the queue.
#[derive(Clone)]
pub struct EventSink {
    queue: mpsc::Sender<ServiceEvent>,
}

impl EventSink {
    /// Queues `event` without waiting; a full queue drops it.
    pub fn send(&self, event: ServiceEvent) {
        if let Err(err) = self.queue.try_send(event) {
            warn!(error = %err, "dropped a Kubernetes event: the queue is full");
        }
    }
}

/// Starts the publishing task on the current runtime; returns its sink.
pub fn spawn(client: Client, node: Option<String>) -> EventSink {
    let (queue, mut events) = mpsc::channel::<ServiceEvent>(QUEUE);
    let reporter = Reporter {
        controller: "lb-agent".into(),
        instance: node,
    };
    let recorder = Recorder::new(client, reporter);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(event.namespace.clone()),
                name: Some(event.name.clone()),
                uid: event.uid.clone(),
                ..ObjectReference::default()
            };
            let published = recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: event.reason.into(),
                        note: Some(event.note.clone()),
                        action: "Program".into(),
                        secondary: None,
                    },
                    &reference,
                )
                .await;
            if let Err(err) = published {
                warn!(
                    service = %format!("{}/{}", event.namespace, event.name),
                    error = %err,
                    "publishing a Kubernetes event"
                );
            }
        }
    });
    EventSink { queue }
}
