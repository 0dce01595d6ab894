{{/* Volume mounts of the roles that read the run config and the shared volume; pass (dict "ctx" $ "role" R). */}}
{{- define "npo.volumeMounts" -}}
- name: config
  mountPath: /etc/npo
  readOnly: true
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
{{- if .role.shmSize }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* The volumes matching npo.volumeMounts; pass (dict "ctx" $ "role" R). */}}
{{- define "npo.volumes" -}}
- name: config
  configMap:
    name: {{ include "npo.configName" .ctx }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "npo.dataClaim" .ctx }}
- name: tmp
  emptyDir: {}
{{- if .role.shmSize }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .role.shmSize | quote }}
{{- end }}
{{- end }}
