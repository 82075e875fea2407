variable "project" {
  description = "Google Cloud project id (FTPIPE_PROJECT)."
  type        = string
}

variable "env" {
  description = "Environment name (dev, prod): a label on every resource and a suffix where names are global."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,15}$", var.env))
    error_message = "env: up to 16 of [a-z0-9-], starting with a letter."
  }
}

variable "region" {
  description = "Region of the bucket, Cloud Run, the function, Dataproc batches and the GKE cluster."
  type        = string
  default     = "europe-west1"
}

variable "firestore_location" {
  description = "Firestore location (a region or multi-region such as eur3)."
  type        = string
  default     = "europe-west1"
}

variable "bucket" {
  description = "The ftpipe bucket (FTPIPE_BUCKET): incoming/, datasets/, runs/, models/, recipes/, and dist/ for the wheel and the registry function's source. Globally unique."
  type        = string
}

variable "checkpoint_retention_days" {
  description = "Checkpoints under runs/*/checkpoints/ are deleted this many days after they were written (the final adapter and the registered models stay)."
  type        = number
  default     = 30
}

variable "noncurrent_retention_days" {
  description = "Overwritten or deleted object versions are kept this long (bucket versioning), then deleted."
  type        = number
  default     = 30
}

variable "archive_after_days" {
  description = "Objects under models/ and datasets/ move to the ARCHIVE storage class after this many days."
  type        = number
  default     = 365
}

variable "image_tag" {
  description = "Tag of the build to deploy: the images in Artifact Registry and gs://BUCKET/dist/TAG/ (the wheel, the Dataproc entrypoint, the registry function's source), all uploaded by cloudbuild.yaml (its _TAG, by default the commit SHA)."
  type        = string
}

variable "max_delivery_attempts" {
  description = "Delivery attempts before a pull subscription dead-letters a message (FTPIPE_MAX_DELIVERY_ATTEMPTS; 5..100)."
  type        = number
  default     = 5
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "Pub/Sub accepts 5..100 delivery attempts."
  }
}

variable "evaluator_max_delivery_attempts" {
  description = "Delivery attempts of the evaluator's push subscription. With the 600 s maximum backoff, attempts x 600 s must exceed the longest evaluation (README, Deploying the evaluator)."
  type        = number
  default     = 10
  validation {
    condition     = var.evaluator_max_delivery_attempts >= 5 && var.evaluator_max_delivery_attempts <= 100
    error_message = "Pub/Sub accepts 5..100 delivery attempts."
  }
}

variable "evaluator_gpu" {
  description = "Give the evaluator's Cloud Run service one NVIDIA L4 (an evaluation loads the base and the candidate)."
  type        = bool
  default     = true
}

variable "evaluator_max_instances" {
  description = "Most evaluator instances (each evaluates one run at a time)."
  type        = number
  default     = 2
}

variable "dashboard_domain" {
  description = "Domain of the dashboard's HTTPS load balancer (a Google-managed certificate is issued for it; point its A record at the output dashboard_ip)."
  type        = string
}

variable "dashboard_users" {
  description = "Who may pass IAP to the dashboard and API, as IAM members (user:ann@example.com, group:ml@example.com)."
  type        = list(string)
  default     = []
}

variable "iap_oauth2_client_id" {
  description = "OAuth client for IAP; empty uses Google's managed client (enough for users of your organisation)."
  type        = string
  default     = ""
}

variable "iap_oauth2_client_secret" {
  description = "Secret of iap_oauth2_client_id."
  type        = string
  default     = ""
  sensitive   = true
}

variable "approvers" {
  description = "Emails that may call the approval function (roles/run.invoker): an outer fence only; whether a caller may approve a version is its ftpipe role (approver of a tenant that owns the model: `ftpipe roles grant`)."
  type        = list(string)
  default     = []
}

variable "admins" {
  description = "Emails that are ftpipe admins whatever the role documents say (FTPIPE_ADMINS): the break-glass that no Firestore writer can grant themselves. They grant everyone else's roles with `ftpipe roles grant`."
  type        = list(string)
  default     = []
}

variable "judge_urls" {
  description = "The LLM judges a recipe's eval.judge.base_url may name (FTPIPE_JUDGE_URLS): URL prefixes such as https://judge.example.com/v1. Checked at submission and by the evaluator before every request; probe answers go to no other host. Empty: recipes may not name a judge in the cloud (the rules judge alone)."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for url in var.judge_urls : can(regex("^https?://[^/,]+", url)) && !strcontains(url, ",")])
    error_message = "Each judge URL is an http(s) URL with a host and no comma, e.g. https://judge.example.com/v1."
  }
}

variable "serving_callers" {
  description = "Service accounts' and people's emails that may call the serving API (FTPIPE_SERVING_CALLERS in output serving_env, and roles/run.invoker where it is deployed). Groups: grant run.invoker to the group; ID tokens carry no groups."
  type        = list(string)
  default     = []
}

variable "tenants" {
  description = "Tenants' doors and the principals (\"user:ann@x\", \"group:team-a@x\", \"serviceAccount:...\") that may use them: drop_writers create objects under gs://BUCKET/incoming/<tenant>/ (objectCreator conditioned on that prefix), job_publishers publish on the Pub/Sub topic job-requests.<tenant> (doors.tf). What arrives through a door acts as a submitter of that tenant and no more. An admin creates the tenant in ftpipe too (`ftpipe tenants set T ...`)."
  type = map(object({
    drop_writers   = optional(list(string), [])
    job_publishers = optional(list(string), [])
  }))
  default = {}
}

variable "gke_master_cidr" {
  description = "The /28 of the private GKE control plane."
  type        = string
  default     = "172.16.0.0/28"
}

variable "gke_master_authorized_networks" {
  description = "CIDRs allowed to reach the GKE control plane (kubectl)."
  type        = map(string)
  default     = {}
}

variable "system_pool" {
  description = "The CPU node pool: the preprocess service, Kueue and cluster add-ons."
  type = object({
    machine_type = string
    min_nodes    = number
    max_nodes    = number
  })
  default = {
    machine_type = "e2-standard-4"
    min_nodes    = 1
    max_nodes    = 3
  }
}

variable "gpu_pools" {
  description = <<-EOT
    GPU node pools, by name. The name must be what a recipe's hardware resolves to (shared/domain/recipe.py
    HardwareSpec.pool: ftpipe-<gpu>[-spot]) and accelerator the GKE type of its gpu (GKE_ACCELERATORS);
    tests/infra checks both. Every pool scales from 0: nodes exist only while a trainer pod needs one.
  EOT
  type = map(object({
    gpu           = string
    accelerator   = string
    gpus_per_node = number
    machine_type  = string
    spot          = bool
    max_nodes     = number
  }))
}

variable "trainer_namespace" {
  description = "Kubernetes namespace of the trainer and preprocess workloads (services/trainer/k8s.py renders into it)."
  type        = string
  default     = "ftpipe"
}

variable "firestore_run_metric_orders" {
  description = "Metrics the dashboard and API sort runs by (GET /api/runs?order_by=final_metrics.NAME): each gets a composite index per run filter, as Firestore requires (docs/tracker-api.md)."
  type        = list(string)
  default     = ["final_metrics.val_loss", "final_metrics.train_loss"]
}

variable "approval_audience" {
  description = "Audience the approval function expects in callers' ID tokens (FTPIPE_APPROVAL_AUDIENCE). Empty: the function's URL, what a service account's token minted with --audiences=URL carries. A person's token from `gcloud auth print-identity-token` carries gcloud's OAuth client id instead (docs/deploy.md)."
  type        = string
  default     = ""
}
