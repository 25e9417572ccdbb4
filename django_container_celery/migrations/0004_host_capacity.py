import django
import django.core.validators
from django.db import migrations, models


def check_constraint(condition, name):
    # Django 5.1 renamed CheckConstraint's "check" argument to "condition".
    keyword = "condition" if django.VERSION >= (5, 1) else "check"
    return models.CheckConstraint(name=name, **{keyword: condition})


class Migration(migrations.Migration):

    dependencies = [
        ('django_container_celery', '0003_holding_index'),
    ]

    operations = [
        migrations.AddField(
            model_name='executorhost',
            name='cpu_capacity',
            field=models.FloatField(blank=True, help_text='Cores the jobs holding slots here may use together (the sum of their CPU limits). Empty: CPU is not counted.', null=True, validators=[django.core.validators.MinValueValidator(0.01)]),
        ),
        migrations.AddField(
            model_name='executorhost',
            name='memory_capacity_mb',
            field=models.PositiveIntegerField(blank=True, help_text='MiB the jobs holding slots here may use together (the sum of their memory limits). Empty: memory is not counted.', null=True, validators=[django.core.validators.MinValueValidator(4)]),
        ),
        migrations.AddConstraint(
            model_name='executorhost',
            constraint=check_constraint(models.Q(('memory_capacity_mb__isnull', True), ('memory_capacity_mb__gte', 4), _connector='OR'), 'dcc_host_memory_capacity_range'),
        ),
        migrations.AddConstraint(
            model_name='executorhost',
            constraint=check_constraint(models.Q(('cpu_capacity__isnull', True), ('cpu_capacity__gte', 0.01), _connector='OR'), 'dcc_host_cpu_capacity_range'),
        ),
    ]
