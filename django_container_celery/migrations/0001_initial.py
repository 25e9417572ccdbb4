
import django.core.validators
import django.db.models.deletion
import django_container_celery.validators
import uuid
from django.conf import settings
import django
from django.db import migrations, models


def check_constraint(condition, name):
    # Django 5.1 renamed CheckConstraint's "check" argument to "condition".
    keyword = "condition" if django.VERSION >= (5, 1) else "check"
    return models.CheckConstraint(name=name, **{keyword: condition})


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='ExecutorHost',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=100, unique=True)),
                ('connection_string', models.CharField(default='unix:///var/run/docker.sock', help_text='unix:///var/run/docker.sock or tcp://host:2376', max_length=500)),
                ('tls_enabled', models.BooleanField(default=False)),
                ('tls_verify', models.BooleanField(default=True)),
                ('tls_ca_cert', models.CharField(blank=True, help_text='Path to ca.pem', max_length=500)),
                ('tls_client_cert', models.CharField(blank=True, help_text='Path to cert.pem', max_length=500)),
                ('tls_client_key', models.CharField(blank=True, help_text='Path to key.pem', max_length=500)),
                ('is_active', models.BooleanField(default=True)),
                ('max_concurrent_jobs', models.PositiveIntegerField(default=10, help_text='Jobs this host may run at once (launching and running).', validators=[django.core.validators.MinValueValidator(1)])),
                ('weight', models.PositiveIntegerField(default=100, help_text='Relative share of unpinned jobs when several hosts have room.', validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(1000)])),
                ('auto_pull_images', models.BooleanField(default=False)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
            options={
                'ordering': ['name'],
                'constraints': [check_constraint(models.Q(('max_concurrent_jobs__gte', 1)), 'dcc_host_capacity_positive')],
            },
        ),
        migrations.CreateModel(
            name='ContainerJob',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('name', models.CharField(blank=True, max_length=200)),
                ('description', models.TextField(blank=True)),
                ('docker_image', models.CharField(max_length=255, validators=[django_container_celery.validators.validate_image_reference])),
                ('command', models.TextField(blank=True, help_text="Split with shlex and run without a shell; write sh -c '…' for one.", validators=[django_container_celery.validators.validate_command])),
                ('working_directory', models.CharField(blank=True, max_length=255)),
                ('environment', models.JSONField(blank=True, default=dict, validators=[django_container_celery.validators.validate_environment])),
                ('bind_mounts', models.JSONField(blank=True, default=list, help_text="'host_path:container_path[:ro]' entries, from ALLOWED_BIND_MOUNTS only.", validators=[django_container_celery.validators.validate_bind_mounts])),
                ('memory_limit', models.PositiveIntegerField(blank=True, help_text='MiB', null=True, validators=[django_container_celery.validators.validate_memory_limit])),
                ('cpu_limit', models.FloatField(blank=True, help_text='cores', null=True, validators=[django_container_celery.validators.validate_cpu_limit])),
                ('timeout_seconds', models.PositiveIntegerField(default=3600, validators=[django_container_celery.validators.validate_timeout])),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('status', models.CharField(choices=[('pending', 'Pending'), ('queued', 'Queued'), ('launching', 'Launching'), ('running', 'Running'), ('retrying', 'Retrying'), ('completed', 'Completed'), ('failed', 'Failed'), ('cancelled', 'Cancelled')], default='pending', max_length=20)),
                ('priority', models.PositiveSmallIntegerField(default=50, help_text='0-100, higher runs first.', validators=[django_container_celery.validators.validate_priority])),
                ('queued_at', models.DateTimeField(blank=True, null=True)),
                ('scheduled_for', models.DateTimeField(blank=True, null=True)),
                ('launched_at', models.DateTimeField(blank=True, null=True)),
                ('retry_count', models.PositiveIntegerField(default=0)),
                ('max_retries', models.PositiveIntegerField(default=3, validators=[django.core.validators.MaxValueValidator(100)])),
                ('last_error', models.TextField(blank=True)),
                ('last_error_at', models.DateTimeField(blank=True, null=True)),
                ('retry_strategy', models.CharField(blank=True, default='', help_text='default, aggressive, conservative, high_priority or a name from settings.', max_length=50, validators=[django_container_celery.validators.validate_retry_strategy])),
                ('retry_exit_codes', models.JSONField(blank=True, default=list, help_text='Exit codes that mean a transient failure: the job is retried.', validators=[django_container_celery.validators.validate_exit_codes])),
                ('claimed_by', models.CharField(blank=True, default='', max_length=255)),
                ('claimed_at', models.DateTimeField(blank=True, null=True)),
                ('lease_expires_at', models.DateTimeField(blank=True, null=True)),
                ('attempt', models.PositiveIntegerField(default=0, help_text='Number of the current launch attempt; the first is 1.')),
                ('dispatched_at', models.DateTimeField(blank=True, help_text='When the last Celery message was sent.', null=True)),
                ('execution_id', models.CharField(blank=True, max_length=128)),
                ('exit_code', models.IntegerField(blank=True, null=True)),
                ('started_at', models.DateTimeField(blank=True, null=True)),
                ('completed_at', models.DateTimeField(blank=True, null=True)),
                ('stdout_log', models.TextField(blank=True)),
                ('stderr_log', models.TextField(blank=True)),
                ('celery_task_id', models.CharField(blank=True, max_length=255)),
                ('created_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                ('assigned_host', models.ForeignKey(blank=True, help_text='Host of the current attempt.', null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='assigned_jobs', to='django_container_celery.executorhost')),
                ('docker_host', models.ForeignKey(blank=True, help_text='Run on this host only. Empty: the app chooses a host with room.', null=True, on_delete=django.db.models.deletion.PROTECT, related_name='pinned_jobs', to='django_container_celery.executorhost')),
            ],
            options={
                'ordering': ['-created_at'],
                'permissions': [('queue_containerjob', 'Can queue, dequeue and retry container jobs'), ('cancel_containerjob', 'Can cancel container jobs')],
                'indexes': [models.Index(models.OrderBy(models.F('priority'), descending=True), models.F('queued_at'), models.F('id'), condition=models.Q(('status__in', ['queued', 'retrying'])), name='dcc_ready_idx'), models.Index(condition=models.Q(('status__in', ['launching', 'running'])), fields=['assigned_host', 'lease_expires_at'], name='dcc_active_idx'), models.Index(fields=['status', 'completed_at'], name='dcc_status_completed_idx'), models.Index(fields=['created_at'], name='dcc_created_idx')],
                'constraints': [check_constraint(models.Q(('priority__gte', 0), ('priority__lte', 100)), 'dcc_priority_range'), check_constraint(models.Q(('retry_count__gte', 0)), 'dcc_retry_count_gte_0'), check_constraint(models.Q(('max_retries__gte', 0), ('max_retries__lte', 100)), 'dcc_max_retries_range'), check_constraint(models.Q(('status__in', ['pending', 'queued', 'launching', 'running', 'retrying', 'completed', 'failed', 'cancelled'])), 'dcc_status_known')],
            },
        ),
    ]
