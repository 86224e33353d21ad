{{/* ---------------------------------------------------------------- names */}}
{{- define "picospec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "picospec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: <fullname>-<component>. Call with (list $ "verifier"). */}}
{{- define "picospec.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "picospec.fullname" $root | trunc 45 | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "picospec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "picospec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "picospec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- labels */}}
{{- define "picospec.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "picospec.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Standard labels. Call with (list $ "component"). */}}
{{- define "picospec.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "picospec.chart" $root }}
{{ include "picospec.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: picospec
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- capabilities */}}
{{/* "true" when the cluster serves an API version (or values.apiVersions lists it). */}}
{{- define "picospec.hasApi" -}}
{{- $root := index . 0 }}
{{- $api := index . 1 }}
{{- if or ($root.Capabilities.APIVersions.Has $api) (has $api $root.Values.apiVersions) }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}
{{- define "picospec.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "picospec.verifierImage" -}}
{{- $v := .Values.verifier.image }}
{{- $repo := default .Values.image.repository $v.repository }}
{{- $tag := $v.tag | default (printf "%s%s" (default .Chart.AppVersion .Values.image.tag) $v.tagSuffix) }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* ---------------------------------------------------------------- NATS */}}
{{- define "picospec.natsMode" -}}
{{- if .Values.externalNats.url }}external{{ else if .Values.nats.enabled }}subchart{{ else }}builtin{{ end }}
{{- end }}

{{- define "picospec.natsAuthSecret" -}}
{{- default (printf "%s-nats-auth" (include "picospec.fullname" .)) .Values.natsAuth.existingSecret }}
{{- end }}

{{/* The official chart's object name (its fullname logic, with its defaults). */}}
{{- define "picospec.natsSubchartName" -}}
{{- $sub := .Values.nats }}
{{- if $sub.fullnameOverride }}
{{- $sub.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" $sub.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Client URL of the cloud NATS, for pods on cloud nodes. */}}
{{- define "picospec.natsCloudUrl" -}}
{{- $mode := include "picospec.natsMode" . }}
{{- if eq $mode "external" }}
{{- .Values.externalNats.url }}
{{- else if eq $mode "subchart" }}
{{- printf "nats://%s.%s.svc:4222" (include "picospec.natsSubchartName" .) .Release.Namespace }}
{{- else }}
{{- printf "nats://%s.%s.svc:%d" (include "picospec.componentName" (list . "nats")) .Release.Namespace (int .Values.cloudNats.ports.client) }}
{{- end }}
{{- end }}

{{/* Client URL for pods on edge nodes: the node's leaf node, or the cloud NATS without one. */}}
{{- define "picospec.natsEdgeUrl" -}}
{{- if .Values.leafNode.enabled }}
{{- if eq .Values.edge.network "hostNetwork" }}
{{- printf "nats://127.0.0.1:%d" (int .Values.leafNode.ports.client) }}
{{- else }}
{{- printf "nats://$(HOST_IP):%d" (int .Values.leafNode.ports.client) }}
{{- end }}
{{- else }}
{{- include "picospec.natsCloudUrl" . }}
{{- end }}
{{- end }}

{{/* The hub URLs edge leaf nodes dial (without credentials), as a list. */}}
{{- define "picospec.leafHubUrls" -}}
{{- $urls := list }}
{{- if .Values.leafNode.hubUrls }}
{{- $urls = .Values.leafNode.hubUrls }}
{{- else if eq (include "picospec.natsMode" .) "external" }}
{{- $urls = .Values.externalNats.leafUrls }}
{{- else if eq (include "picospec.natsMode" .) "subchart" }}
{{- $urls = list (printf "nats-leaf://%s.%s.svc.cluster.local:7422" (include "picospec.natsSubchartName" .) .Release.Namespace) }}
{{- else }}
{{- $urls = list (printf "nats-leaf://%s.%s.svc.cluster.local:%d" (include "picospec.componentName" (list . "nats-leafnodes")) .Release.Namespace (int .Values.cloudNats.ports.leafnodes)) }}
{{- end }}
{{- toJson $urls }}
{{- end }}

{{/* Does any edge pod sit on the pod network (so the leaf node must listen beyond loopback)? */}}
{{- define "picospec.edgeListenHost" -}}
{{- if eq .Values.edge.network "hostNetwork" }}127.0.0.1{{ else }}0.0.0.0{{ end }}
{{- end }}

{{/* NATS credential env vars for a PicoSpec service container: (list . "<role>"), the role's
own user from the auth Secret (or the mounted credentials file). */}}
{{- define "picospec.natsAuthEnv" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $auth := $root.Values.natsAuth }}
{{- if and $auth.enabled (not $auth.credentialsSecret.name) }}
- name: PICOSPEC_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ include "picospec.natsAuthSecret" $root }}
      key: {{ $role }}-user
- name: PICOSPEC_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "picospec.natsAuthSecret" $root }}
      key: {{ $role }}-password
{{- end }}
{{- if $auth.credentialsSecret.name }}
- name: PICOSPEC_NATS_CREDS
  value: /etc/picospec/nats/{{ $auth.credentialsSecret.key }}
{{- end }}
{{- end }}

{{/* A NATS server's env vars with the users it accepts: (list . "<role>" ...), each as
PICOSPEC_<ROLE>_USER and PICOSPEC_<ROLE>_PASSWORD from the auth Secret. */}}
{{- define "picospec.natsServerAuthEnv" -}}
{{- $root := first . }}
{{- if $root.Values.natsAuth.enabled }}
{{- range $role := rest . }}
{{- range $part := list "user" "password" }}
- name: PICOSPEC_{{ upper $role }}_{{ upper $part }}
  valueFrom:
    secretKeyRef:
      name: {{ include "picospec.natsAuthSecret" $root }}
      key: {{ $role }}-{{ $part }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A NATS server's authorization block: (list . "<role>" ...), one user per role with the
least permissions of files/nats-permissions.json (generated from picospec.protocol.subjects). */}}
{{- define "picospec.natsUsers" -}}
{{- $root := first . }}
{{- if $root.Values.natsAuth.enabled }}
{{- $perms := $root.Files.Get "files/nats-permissions.json" | fromJson }}
authorization {
  users = [
    {{- range $role := rest . }}
    {user: $PICOSPEC_{{ upper $role }}_USER, password: $PICOSPEC_{{ upper $role }}_PASSWORD, permissions: {{ get $perms $role | toRawJson }}}
    {{- end }}
  ]
}
{{- end }}
{{- end }}

{{- define "picospec.natsCredsVolume" -}}
{{- if .Values.natsAuth.credentialsSecret.name }}
- name: nats-creds
  secret:
    secretName: {{ .Values.natsAuth.credentialsSecret.name }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "picospec.natsCredsMount" -}}
{{- if .Values.natsAuth.credentialsSecret.name }}
- name: nats-creds
  mountPath: /etc/picospec/nats
  readOnly: true
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- settings */}}
{{/* PICOSPEC_* env vars from the shared settings merged with a component's (component wins).
     Call with (list $ .Values.<component>.settings). */}}
{{- define "picospec.settingsEnv" -}}
{{- $root := index . 0 }}
{{- $merged := merge (deepCopy (index . 1)) (deepCopy $root.Values.settings) }}
{{- range $k := keys $merged | sortAlpha }}
{{- $v := index $merged $k }}
{{- if not (kindIs "invalid" $v) }}
- name: PICOSPEC_{{ upper $k }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's effective setting. Call with (list $ .Values.<component>.settings "port"). */}}
{{- define "picospec.setting" -}}
{{- $root := index . 0 }}
{{- $merged := merge (deepCopy (index . 1)) (deepCopy $root.Values.settings) }}
{{- index $merged (index . 2) }}
{{- end }}

{{/* Is a model name a Hub id (to download), rather than the embedded model or a path? */}}
{{- define "picospec.isHubModel" -}}
{{- $m := toString . }}
{{- if not (or (has $m (list "smollm2" "default")) (hasPrefix "/" $m) (hasPrefix "." $m) (hasPrefix "~" $m) (hasSuffix ".gguf" $m)) }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- placement */}}
{{/* Node affinity keeping a pod on cloud nodes. Call with (list $ extraExpressions). */}}
{{- define "picospec.cloudNodeAffinity" -}}
{{- $root := index . 0 -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: {{ $root.Values.edge.nodeRoleLabel }}
            operator: DoesNotExist
          {{- with index . 1 }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
{{- end }}

{{/* Node affinity pinning a pod to KubeEdge edge nodes. Call with (list $). */}}
{{- define "picospec.edgeNodeAffinity" -}}
{{- $root := index . 0 -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: {{ $root.Values.edge.nodeRoleLabel }}
            operator: Exists
          {{- with $root.Values.edge.extraMatchExpressions }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
{{- end }}

{{/* Affinity block: node affinity plus any pod (anti-)affinity from values. */}}
{{- define "picospec.affinity" -}}
{{- $nodeAff := index . 0 }}
{{- $extra := index . 1 -}}
affinity:
{{- $nodeAff | nindent 2 }}
{{- with $extra.podAffinity }}
  podAffinity:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- with $extra.podAntiAffinity }}
  podAntiAffinity:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{- define "picospec.edgeNetwork" -}}
{{- if eq .Values.edge.network "hostNetwork" }}
hostNetwork: true
dnsPolicy: {{ default "ClusterFirstWithHostNet" .Values.edge.dnsPolicy }}
{{- else if .Values.edge.dnsPolicy }}
dnsPolicy: {{ .Values.edge.dnsPolicy }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- pods */}}
{{- define "picospec.podSecurityContext" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{- define "picospec.securityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end }}

{{- define "picospec.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* HTTP probes of a PicoSpec service. Call with (list componentValues port). */}}
{{- define "picospec.probes" -}}
{{- $c := index . 0 }}
{{- $port := index . 1 -}}
startupProbe:
  httpGet: {path: /ready, port: {{ $port }}}
  {{- toYaml $c.startupProbe | nindent 2 }}
livenessProbe:
  httpGet: {path: /health, port: {{ $port }}}
  {{- toYaml $c.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet: {path: /ready, port: {{ $port }}}
  {{- toYaml $c.readinessProbe | nindent 2 }}
{{- end }}

{{/* The Hub download init container. Call with (list $ componentValues image). */}}
{{- define "picospec.modelDownload" -}}
{{- $root := index . 0 }}
{{- $c := index . 1 }}
{{- $image := index . 2 }}
{{- $model := toString $c.settings.model -}}
- name: model-download
  image: {{ $image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["python", "-c"]
  args:
    - |
      import json, os
      from huggingface_hub import snapshot_download
      path = snapshot_download(
          os.environ["MODEL"],
          revision=os.environ["REVISION"],
          allow_patterns=json.loads(os.environ["ALLOW_PATTERNS"]),
      )
      print(json.dumps({"event": "model_downloaded", "model": os.environ["MODEL"], "path": path}))
  env:
    - name: MODEL
      value: {{ $model | quote }}
    - name: REVISION
      value: {{ $c.modelDownload.revision | quote }}
    - name: ALLOW_PATTERNS
      value: {{ toJson $c.modelDownload.allowPatterns | quote }}
    - name: HF_HOME
      value: {{ $c.modelCache.mountPath }}
    - name: HOME
      value: /tmp
    {{- with $c.modelDownload.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $c.modelDownload.tokenSecret.key }}
    {{- end }}
  {{- include "picospec.securityContext" $root | nindent 2 }}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {memory: 4Gi}
  volumeMounts:
    - name: model-cache
      mountPath: {{ $c.modelCache.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* Env every PicoSpec container gets: caches on writable volumes, offline Hub. */}}
{{- define "picospec.runtimeEnv" -}}
{{- $c := . -}}
- name: HF_HOME
  value: {{ $c.modelCache.mountPath }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: NODE_NAME
  valueFrom:
    fieldRef: {fieldPath: spec.nodeName}
{{- end }}

{{/* `include` output re-indented like nindent, or nothing at all when it is empty (no stray
     blank lines). Call with (list indent text). */}}
{{- define "picospec.nindent" -}}
{{- $s := index . 1 | trim }}
{{- if $s }}{{ $s | nindent (index . 0) }}{{ end }}
{{- end }}
