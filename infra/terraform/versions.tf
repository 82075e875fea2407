terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.20, < 7"
    }
    # google_project_service_identity (the Pub/Sub, IAP and GCS service agents) is beta-only.
    google-beta = {
      source  = "hashicorp/google-beta"
      version = ">= 6.20, < 7"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
  default_labels = {
    app = "ftpipe"
    env = var.env
  }
}

provider "google-beta" {
  project = var.project
  region  = var.region
}
