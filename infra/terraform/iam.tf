# One service account per service, each granted only what its code does (README "How it fits
# together"): which subscriptions it pulls, which topics it publishes to (its own events; `notices`
# and the dead-letter topics of what it consumes: shared/platform/runtime.py dead_letter), the bucket
# and Firestore. tests/infra/test_terraform.py derives each of these from the code.
locals {
  service_accounts = {
    preprocess = "ftpipe preprocess: pulls uploads and jobs, submits Dataproc batches"
    dataproc   = "ftpipe Dataproc Serverless batches (FTPIPE_DATAPROC_SERVICE_ACCOUNT)"
    trainer    = "ftpipe trainer: GKE pods (Workload Identity)"
    evaluator  = "ftpipe evaluator: Cloud Run, Pub/Sub push"
    push       = "Pub/Sub push to the evaluator (FTPIPE_PUSH_SERVICE_ACCOUNT)"
    registry   = "ftpipe registry: Cloud Functions on_evaluation and approve"
    tracker    = "ftpipe tracker: Cloud Run, lineage writer, API and dashboard"
    serving    = "ftpipe serving: the OpenAI-compatible API over the registry's adapters"
    gke_nodes  = "ftpipe GKE nodes: logs, metrics, image pulls"
  }
  # Topics each service publishes its own events to: the topics of its events in
  # shared/platform/topology.py SERVICE_PUBLISHES, which tests/infra derives from its code. Besides,
  # every consumer publishes the runtime's MessageDeadLettered on `notices` (notices below) and the
  # dead letters of what it consumes (dead_letters below): nothing else, so serving, which publishes
  # nothing of its own, cannot put a job on `jobs`.
  publishes = {
    preprocess = ["jobs", "datasets"]                       # JobSubmitted from a drop; DatasetPrepared / Rejected / AwaitingReview
    trainer    = ["training"]                               # TrainingStarted ... TrainingCompleted / Failed
    evaluator  = ["evaluations"]                            # EvaluationCompleted / Errored
    registry   = ["models"]                                 # ModelRegistered / Promoted / Quarantined / Approved / Archived
    tracker    = ["jobs", "datasets", "training", "models"] # the API's submit, sign-off, registry actions, reevaluate
    serving    = []
  }
  # Topics each service consumes, so dead-letters to (shared/platform/topology.py SERVICE_TOPICS).
  consumes = {
    preprocess = ["dataset-uploads", "jobs"]
    trainer    = ["datasets", "jobs"]
    evaluator  = ["training"]
    registry   = ["evaluations"]
    tracker    = ["jobs", "datasets", "training", "evaluations", "models", "notices"]
    serving    = ["models"] # promotions preload an adapter, quarantines unload it
  }
  publish_grants = {
    for pair in distinct(flatten([
      for service, topics in local.publishes : [for topic in topics : { service = service, topic = topic }]
    ])) : "${pair.service}:${pair.topic}" => pair
  }
  dead_letter_grants = merge({
    for pair in flatten([
      for service, topics in local.consumes : [for topic in topics : { service = service, topic = topic }]
    ]) : "${pair.service}:${pair.topic}" => pair
    }, { for tenant in keys(local.doors) : "preprocess:job-requests.${tenant}" => {
  service = "preprocess", topic = "job-requests.${tenant}" } })

  # Services that read and write the bucket and Firestore.
  data_services = ["preprocess", "dataproc", "trainer", "evaluator", "registry", "tracker"]
  # Services that only read Firestore's (default) database and write their ledger's (firestore.tf;
  # shared/platform/topology.py DOCS_READERS).
  docs_readers = ["serving"]
  # Services that only read the bucket (shared/platform/topology.py STORE_READERS).
  store_readers = ["serving"]
  sa_member     = { for k, sa in google_service_account.sa : k => "serviceAccount:${sa.email}" }
}

resource "google_service_account" "sa" {
  for_each     = local.service_accounts
  account_id   = "ftpipe-${replace(each.key, "_", "-")}-${var.env}"
  display_name = each.value
  depends_on   = [google_project_service.apis]
}

# ------------------------------------------------------------------ Pub/Sub
resource "google_pubsub_topic_iam_member" "publishes" {
  for_each = local.publish_grants
  topic    = google_pubsub_topic.topics[each.value.topic].id
  role     = "roles/pubsub.publisher"
  member   = local.sa_member[each.value.service]
}

# The runtime's MessageDeadLettered (shared/platform/runtime.py dead_letter), from every consumer.
resource "google_pubsub_topic_iam_member" "notices" {
  for_each = local.consumes
  topic    = google_pubsub_topic.topics["notices"].id
  role     = "roles/pubsub.publisher"
  member   = local.sa_member[each.key]
}

resource "google_pubsub_topic_iam_member" "dead_letters" {
  for_each = local.dead_letter_grants
  topic    = google_pubsub_topic.dead_letter[each.value.topic].id
  role     = "roles/pubsub.publisher"
  member   = local.sa_member[each.value.service]
}

# Pulling needs subscriber; reading the subscription (viewer: its dead-letter policy, filter and
# the max-attempts label) lets the adapter dead-letter with a reason instead of leaving it all to
# the server policy.
resource "google_pubsub_subscription_iam_member" "pulls" {
  for_each     = local.all_pull_subscriptions
  subscription = google_pubsub_subscription.pull[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.sa_member[each.value.service]
}

resource "google_pubsub_subscription_iam_member" "reads_subscription" {
  for_each     = local.all_pull_subscriptions
  subscription = google_pubsub_subscription.pull[each.key].id
  role         = "roles/pubsub.viewer"
  member       = local.sa_member[each.value.service]
}

# ------------------------------------------------------------------ storage and Firestore
resource "google_storage_bucket_iam_member" "data" {
  for_each = toset(local.data_services)
  bucket   = google_storage_bucket.data.name
  role     = "roles/storage.objectUser"
  member   = local.sa_member[each.key]
}

# Each tenant's door: its principals may create objects under incoming/<tenant>/ only (a drop there is
# a submitter of that tenant: services/preprocess/service.py on_upload). Nobody else writes there, and
# they write nowhere else: not recipes/, which the tenant's drops read.
resource "google_storage_bucket_iam_member" "tenant_doors" {
  for_each = { for pair in flatten([for tenant, t in var.tenants : [for who in t.drop_writers : {
  key = "${tenant}/${who}", tenant = tenant, member = who }]]) : pair.key => pair }
  bucket = google_storage_bucket.data.name
  role   = "roles/storage.objectCreator"
  member = each.value.member
  condition {
    title      = "door-${each.value.tenant}"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.data.name}/objects/incoming/${each.value.tenant}/\")"
  }
}

# Serving only reads the bucket (adapter files through their bundle).
resource "google_storage_bucket_iam_member" "reads" {
  for_each = toset(local.store_readers)
  bucket   = google_storage_bucket.data.name
  role     = "roles/storage.objectViewer"
  member   = local.sa_member[each.key]
}

resource "google_project_iam_member" "firestore" {
  for_each = toset([for s in local.data_services : s if s != "dataproc"])
  project  = var.project
  role     = "roles/datastore.user"
  member   = local.sa_member[each.key]
}

# Serving reads the registry's documents in (default), and writes only its processed-message
# ledger, in a database of its own: no project-wide Firestore role.
resource "google_project_iam_member" "firestore_reads" {
  for_each = toset(local.docs_readers)
  project  = var.project
  role     = "roles/datastore.viewer"
  member   = local.sa_member[each.key]
  condition {
    title       = "${each.key}-reads-default-database"
    description = "Reads of the (default) Firestore database only"
    expression  = "resource.name == \"projects/${var.project}/databases/${google_firestore_database.default.name}\""
  }
}

resource "google_project_iam_member" "ledger" {
  for_each = toset(local.docs_readers)
  project  = var.project
  role     = "roles/datastore.user"
  member   = local.sa_member[each.key]
  condition {
    title       = "${each.key}-writes-its-ledger"
    description = "Reads and writes of its own ledger's Firestore database only"
    expression  = "resource.name == \"projects/${var.project}/databases/${google_firestore_database.ledger[each.key].name}\""
  }
}

# ------------------------------------------------------------------ GKE
resource "google_project_iam_member" "gke_nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
  ])
  project = var.project
  role    = each.key
  member  = local.sa_member["gke_nodes"]
}

resource "google_artifact_registry_repository_iam_member" "pulls_images" {
  for_each   = toset(["gke_nodes", "dataproc"])
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = local.sa_member[each.key]
}

# Workload Identity: the Kubernetes service accounts of infra/k8s act as these accounts.
resource "google_service_account_iam_member" "workload_identity" {
  for_each           = { trainer = "ftpipe-trainer", preprocess = "ftpipe-preprocess" }
  service_account_id = google_service_account.sa[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project}.svc.id.goog[${var.trainer_namespace}/${each.value}]"
  depends_on         = [google_container_cluster.main]
}
