//! A small, blocking client of the Kubernetes Container Runtime Interface (CRI `runtime.v1`,
//! what containerd 1.6 serves on its gRPC socket): the calls a kubelet makes to run a pod,
//! over a Unix socket, on a current-thread tokio runtime. The messages and gRPC stubs are
//! k8s-cri's, generated from the CRI's `api.proto`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;
use tower::service_fn;

/// A deadline for one call: a crib sandbox boots a VM in RunPodSandbox (nested KVM in the
/// lab), the slowest call here.
const CALL_TIMEOUT: Duration = Duration::from_secs(180);

/// The runtime and image services of one CRI socket.
pub struct CriClient {
    tokio: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// Runs one call to its end on `tokio`.
fn wait<T>(
    tokio: &tokio::runtime::Runtime,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    tokio.block_on(call).map(tonic::Response::into_inner)
}

/// One blocking method per CRI call: `name(request) -> response` on `client`.
macro_rules! calls {
    ($($client:ident.$name:ident($request:ident) -> $response:ident;)*) => {
        $(
            pub fn $name(&mut self, request: cri::$request) -> Result<cri::$response, Status> {
                let call = self.$client.$name(request);
                wait(&self.tokio, call)
            }
        )*
    };
}

impl CriClient {
    /// Connects to the CRI socket at `socket` (containerd's gRPC address).
    pub fn connect(socket: &Path) -> Result<Self> {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a tokio runtime")?;
        let path: PathBuf = socket.to_path_buf();
        // The URI is a placeholder: the connector ignores it and dials the socket.
        let endpoint = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(10))
            .timeout(CALL_TIMEOUT);
        let channel = tokio
            .block_on(
                endpoint.connect_with_connector(service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                })),
            )
            .with_context(|| format!("cannot connect to the CRI socket {}", socket.display()))?;
        Ok(Self {
            tokio,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    calls! {
        runtime.version(VersionRequest) -> VersionResponse;
        runtime.status(StatusRequest) -> StatusResponse;
        runtime.run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        runtime.pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        runtime.stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        runtime.remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        runtime.list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        runtime.create_container(CreateContainerRequest) -> CreateContainerResponse;
        runtime.start_container(StartContainerRequest) -> StartContainerResponse;
        runtime.container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        runtime.stop_container(StopContainerRequest) -> StopContainerResponse;
        runtime.remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        runtime.list_containers(ListContainersRequest) -> ListContainersResponse;
        runtime.exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        runtime.container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        images.image_status(ImageStatusRequest) -> ImageStatusResponse;
    }
}
