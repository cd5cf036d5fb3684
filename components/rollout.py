"""Roll the serving Deployment after `prod` moves, so the pods serve the new version.

The register step (inside the cluster), and `make promote-cluster` / `rollback-cluster` (from a kubeconfig
context), patch annotation rental-price/model-version on the pod template: Kubernetes replaces the pods, and each
serves the version the annotation names (handed to the container as MODEL_VERSION). The RBAC the step needs
(patch on that one Deployment) is in manifests/serving/.
"""

import os

from components.names import PREFIX

ANNOTATION = f"{PREFIX}/model-version"


def roll_serving(version: str, api=None, context: str = "") -> str:
    """Patch the serving Deployment's pod template with `version`; returns what was done, for the log."""
    namespace = os.environ.get("SERVING_NAMESPACE", "serving")
    name = os.environ.get("SERVING_DEPLOYMENT", f"{PREFIX}-serve")
    if api is None:
        if not context and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return "not running in a cluster: no serving Deployment to roll"
        from kubernetes import client, config

        if context:  # KUBECONFIG as it is now (the library reads it once, at import)
            api = client.AppsV1Api(config.new_client_from_config(os.environ.get("KUBECONFIG"), context=context))
        else:
            config.load_incluster_config()
            api = client.AppsV1Api()
    from kubernetes.client.exceptions import ApiException

    patch = {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: str(version)}}}}}
    try:
        api.patch_namespaced_deployment(name, namespace, patch)
    except ApiException as exc:
        # prod has moved already; a model server not deployed yet (or not ours to patch) is no reason to fail.
        return (f"did not roll deployment {namespace}/{name} ({exc.status} {exc.reason}): its pods load "
                f"version {version} when they next start (make serve)")
    return f"patched deployment {namespace}/{name}: {ANNOTATION}={version}, pods roll to it"
