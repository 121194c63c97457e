terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x: the schema tests/deploy checks against (the CDKTF bindings 16.x carry 6.50).
      version = ">= 6.10, < 7.0"
    }
  }
}
