"""The fields of the custom resources we deploy, as JSON schemas (our own, written from the
KubeRay v1 and prometheus-operator v1 API references): no CRD schema is on any package
registry, so this checks that every field we set exists where we set it and has the right
type. Pod templates inside a RayService are validated separately against Kubernetes' own
core/v1 schema (kubernetes-validate)."""

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT = {"type": "object"}


def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """An object that allows only ``properties``."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def resource(kind: str, api_version: str, spec: dict) -> dict:
    return closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": closed(
                {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": STRING_MAP,
                 "annotations": STRING_MAP},  # fmt: skip
                ("name",),
            ),
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


HEAD_GROUP = closed(
    {
        "rayStartParams": STRING_MAP,  # KubeRay takes only strings here
        "template": ANY_OBJECT,  # core/v1 PodTemplateSpec: validated by kubernetes-validate
        "serviceType": {"type": "string"},
        "headService": ANY_OBJECT,
        "enableIngress": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
    ("template",),
)
WORKER_GROUP = closed(
    {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "rayStartParams": STRING_MAP,
        "template": ANY_OBJECT,
        "scaleStrategy": ANY_OBJECT,
        "suspend": {"type": "boolean"},
    },
    ("groupName", "template"),
)
AUTOSCALER_OPTIONS = closed(
    {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "version": {"enum": ["v1", "v2"]},
        "resources": ANY_OBJECT,
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "securityContext": ANY_OBJECT,
    }
)
RAY_CLUSTER_SPEC = closed(
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": STRING_MAP,
        "suspend": {"type": "boolean"},
        "gcsFaultToleranceOptions": ANY_OBJECT,
        "managedBy": {"type": "string"},
    },
    ("headGroupSpec",),
)
RAY_SERVICE = resource(
    "RayService",
    "ray.io/v1",
    closed(
        {
            "serveConfigV2": {"type": "string"},
            "rayClusterConfig": RAY_CLUSTER_SPEC,
            "upgradeStrategy": closed(
                {"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                 "clusterUpgradeOptions": ANY_OBJECT}  # fmt: skip
            ),
            "serveService": ANY_OBJECT,
            "excludeHeadPodFromServeSvc": {"type": "boolean"},
            "rayClusterDeletionDelaySeconds": {"type": "integer"},
        },
        ("serveConfigV2", "rayClusterConfig"),
    ),
)

RELABELING = closed(
    {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
    }
)
POD_MONITOR = resource(
    "PodMonitor",
    "monitoring.coreos.com/v1",
    closed(
        {
            "selector": ANY_OBJECT,
            "namespaceSelector": ANY_OBJECT,
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array"},
            "podMetricsEndpoints": {
                "type": "array",
                "items": closed(
                    {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "relabelings": {"type": "array", "items": RELABELING},
                        "metricRelabelings": {"type": "array", "items": RELABELING},
                        "honorLabels": {"type": "boolean"},
                    }
                ),
            },
        },
        ("selector", "podMetricsEndpoints"),
    ),
)
PROMETHEUS_RULE = resource(
    "PrometheusRule",
    "monitoring.coreos.com/v1",
    closed({"groups": {"type": "array", "minItems": 1}}, ("groups",)),  # rules: promtool checks them
)

SCHEMAS = {"RayService": RAY_SERVICE, "PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
