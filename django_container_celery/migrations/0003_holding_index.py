from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('django_container_celery', '0002_integrity'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='containerjob',
            index=models.Index(condition=models.Q(('status__in', ['launching', 'running']), ('stop_pending', True), _connector='OR'), fields=['assigned_host'], name='dcc_holding_idx'),
        ),
    ]
